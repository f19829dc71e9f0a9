"""The contract between the stages, importable without torch (pydantic + numpy only).

- `sampling`: sampling parameters, their defaults and limits (the `SAMPLING` tensor is their JSON);
- `streaming`: the vocoder's window sizes;
- `audio`: audio rates, limits and the torch-free input decoder (client uploads and the codec share it);
- `serving`: `ServingConfig`, what `moss-speech build` writes into every model and the adapters read back;
- `window`: one speech window as it travels from `llm` to `vocoder` (`WINDOW_TOKENS`, `WINDOW_META`, `VOICE_ID`);
- `tensors`: names, types and shapes of every Triton model and ensemble;
- `metrics`: metric names shared by the Triton models and the service;
- `docs`: renders the tables of docs/contracts.md from the above.
"""
