"""Process plumbing: the main process's supervision (lifecycle.py), the inference worker's loop
(worker.py), the HTTP process's link to it (frontend.py), the messages between them and their
transport (wire.py), and the state all processes share (shared_state.py)."""
