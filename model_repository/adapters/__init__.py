"""Triton Python-backend adapters: translate Triton tensors to and from the library (runs inside tritonserver).

The repository that `moss-speech build` writes holds, per model, a one-line `model.py` importing one of these.
"""
