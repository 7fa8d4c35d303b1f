"""Serving: ONNX Runtime engine with continuous batching behind an OpenAI-compatible HTTP API."""
