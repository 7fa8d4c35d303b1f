"""The running batch and its KV cache, one module pair per layout (batch.py is the interface):
concat (concat_batch.py over concat_cache.py: the generic model.onnx, any provider) and inplace
(inplace_batch.py over inplace_cache.py: the bundle's in-place graph, the cache allocated once)."""
