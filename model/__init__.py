"""Model: a decoder-only GPT trained from scratch, its tokenizer, data, training and ONNX export.

Importing this package does not import torch; the submodules that need it do.
"""
