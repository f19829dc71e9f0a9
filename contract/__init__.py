"""The contract between the stages, importable without torch (pydantic + numpy only)."""
