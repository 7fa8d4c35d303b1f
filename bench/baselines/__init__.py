"""Baselines for the serving comparison (``python -m bench.compare``), around the same Engine.

- ``bench.baselines.litserve_api``: the engine behind LitServe's own loops. With
  ``max_batch_size > 1`` LitServe's ``BatchedStreamingLoop`` runs static batching (a batch
  runs until its longest request ends; new requests wait); with ``max_batch_size=1`` its
  ``StreamingLoop`` serves one request at a time. Both expose a minimal OpenAI-compatible
  ``POST /v1/completions`` (SSE) and ``POST /tokenize``: what a LitServe user gets by default.
- ``bench.baselines.serve``: the command line that starts one of those servers.
- ``bench.baselines.offline``: the engine in-process, no HTTP, as a closed loop of N sequences:
  the ceiling.
- ``bench.baselines.common``: what they share (engine options, prompt encoding, SSE chunks).
"""
