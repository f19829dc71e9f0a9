"""Everything about the Triton model repository, where it runs:

- `adapters/`: the thin Python-backend models (run inside tritonserver's Python stub);
- `runtime/`: the LLM runtimes, the codec runtime and the continuous-batching engine they drive (inside tritonserver);
- `templates/` + `writer.py`: the config.pbtxt templates and the writer `moss-speech build` uses (build time);
- `launcher.py`: starts a tritonserver on a written repository (the local stack, the chart's entrypoint).
"""
