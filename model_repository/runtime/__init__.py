"""What the `llm`, `speech_encoder` and `vocoder` models run inside tritonserver: LLM runtimes behind one
interface (`base.LLMRuntime`: torch reference, onnxruntime, TensorRT), the codec runtime, and the
continuous-batching `Engine`. Runtimes load built artifacts; they never import the exporters."""
