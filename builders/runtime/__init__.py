"""LLM runtimes behind one interface (`base.LLMRuntime`): torch (reference), onnxruntime, TensorRT."""
