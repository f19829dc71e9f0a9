"""OpenAI-Realtime-compatible WebSocket gateway (`/v1/realtime`) in front of the public gRPC service.

A separate process (`moss-speech realtime`): it speaks the GA Realtime protocol to clients, runs server VAD
(silero-vad's ONNX model on onnxruntime) and barge-in, and speaks the public gRPC API (`StreamConverse`,
`TruncateReply`, sessions) to the service, so the service stays free of onnxruntime and WebSocket code and each
scales on its own. See docs/realtime.md.
"""
