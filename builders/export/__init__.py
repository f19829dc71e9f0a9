"""Exporters (ONNX graphs) and engine builders (TensorRT) for the serving artifacts."""
