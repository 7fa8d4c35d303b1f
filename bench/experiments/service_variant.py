"""The service's engine with ONNX Runtime session options changed, to measure proposals
without editing service/.

    python -m bench.compare --bundle artifacts/small --servers service,offline \\
        --env TEXTGEN_ENGINE_CLASS=bench.experiments.service_variant:VariantEngine \\
        --env BENCH_ENGINE_VARIANT=nospin

``TEXTGEN_ENGINE_CLASS`` is the service's own setting (module:Class of the engine, imported in
its inference worker); ``bench.baselines.common.build_engine`` honours it too, so the LitServe
baselines and the offline engine run the same variant. Variants (comma-separated in
``BENCH_ENGINE_VARIANT``):

- ``nospin``: ONNX Runtime's intra-op threads do not spin while waiting for work
  (session config ``session.intra_op.allow_spinning = "0"``; the service has since made it its
  default in service/engine/kv/concat_batch.py, so this variant now changes nothing).
"""

from __future__ import annotations

import os

import onnxruntime as ort

from service.engine.config import EngineConfig
from service.engine.engine import Engine

VARIANT_ENV = "BENCH_ENGINE_VARIANT"
VARIANTS = ("nospin",)


def variants() -> set[str]:
    """The variants named in ``BENCH_ENGINE_VARIANT``; raises ValueError for an unknown one."""
    chosen = {v.strip() for v in os.environ.get(VARIANT_ENV, "").split(",") if v.strip()}
    unknown = chosen - set(VARIANTS)
    if unknown:
        raise ValueError(f"{VARIANT_ENV}: unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    return chosen


class _NoSpinOptions(ort.SessionOptions):
    def __init__(self) -> None:
        super().__init__()
        self.add_session_config_entry("session.intra_op.allow_spinning", "0")


class VariantEngine(Engine):
    """The service's Engine; its ONNX Runtime session is built with the variants' options."""

    def __init__(self, bundle, config: EngineConfig = EngineConfig()):
        chosen = variants()
        base = ort.SessionOptions
        if "nospin" in chosen:
            ort.SessionOptions = _NoSpinOptions  # service.engine.kv.concat_batch builds its options from ort.SessionOptions()
        try:
            super().__init__(bundle, config)
        finally:
            ort.SessionOptions = base
