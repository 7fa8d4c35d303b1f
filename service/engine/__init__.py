"""The engine, run in the inference worker: token ids in, tokens and text out, for many requests
at once (engine.py), with its scheduler, sampler, detokenizer, finishing rules, request rules and
KV-cache layouts (kv/). Pure logic except kv/, which owns the ONNX Runtime session.

This package's __init__ imports nothing, so that the HTTP process can import its plain data
(types.py, rules.py) without loading ONNX Runtime."""
