"""The HTTP side, run in each uvicorn process: routes, request models, request → engine work
(jobs.py), engine outputs → responses (choices.py, formatting.py, handlers.py), errors.
No model, no ONNX Runtime: the engine runs in the inference worker (service/process/worker.py)."""
