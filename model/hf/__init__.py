"""Import of Hugging Face causal LM checkpoints into textgen bundles (``python -m model import --hf``)."""
