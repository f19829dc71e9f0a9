"""Triton model adapters and config templates.

The model repository that `moss-speech build` writes holds, per model, a config.pbtxt rendered from
`templates/` and a one-line `model.py` that imports the adapter class from this package. The adapters only
translate between Triton tensors and the library (`moss_speech.builders`).
"""
