"""The service with experimental changes, to measure proposals without editing service/.

    BENCH_SERVICE_VARIANT=zmq python -m bench.baselines.service_variant --model DIR --port P
    python -m bench.compare --bundle artifacts/small --servers service,offline \\
        --service-module bench.baselines.service_variant --env BENCH_SERVICE_VARIANT=zmq

Variants (comma-separated in ``BENCH_SERVICE_VARIANT``):

- ``zmq``: LitServe's ZeroMQ transport between the inference worker and the HTTP processes
  instead of a multiprocessing Manager queue. ``LitServer(fast_queue=True)`` is meant to do
  this, but LitServe 0.2.19 passes ``TransportConfig(transport_config=...)`` (a field that does
  not exist, silently ignored), so the Manager queue is always used; here the field is set.
- ``nospin``: ONNX Runtime's intra-op threads do not spin while waiting for work
  (``session.intra_op.allow_spinning=0``). Applied through ``TEXTGEN_ENGINE_CLASS`` =
  ``bench.baselines.service_variant:VariantEngine``, which this module sets for the worker;
  ``bench.baselines.common.build_engine`` honours the same setting, so the baselines and the
  offline engine get the same engine.
"""

from __future__ import annotations

import os
import sys

from service.engine import Engine

VARIANT_ENV = "BENCH_SERVICE_VARIANT"
VARIANTS = ("zmq", "nospin")
ENGINE_CLASS = "bench.baselines.service_variant:VariantEngine"


def variants() -> set[str]:
    chosen = {v.strip() for v in os.environ.get(VARIANT_ENV, "").split(",") if v.strip()}
    unknown = chosen - set(VARIANTS)
    if unknown:
        raise ValueError(f"{VARIANT_ENV}: unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    return chosen


class VariantEngine(Engine):
    """The service's Engine, with ONNX Runtime session options changed as the variants say."""

    def __init__(self, bundle, **kwargs):
        if "nospin" in variants():
            import onnxruntime as ort

            base = ort.SessionOptions

            class NoSpinOptions(base):  # type: ignore[misc, valid-type]
                def __init__(self) -> None:
                    super().__init__()
                    self.add_session_config_entry("session.intra_op.allow_spinning", "0")

            ort.SessionOptions = NoSpinOptions
            try:
                super().__init__(bundle, **kwargs)
            finally:
                ort.SessionOptions = base
        else:
            super().__init__(bundle, **kwargs)


def _use_zmq_transport() -> None:
    import litserve.server

    init = litserve.server.LitServer.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.transport_config.transport_type = "zmq"

    litserve.server.LitServer.__init__ = patched


def main(argv: list[str] | None = None) -> int:
    chosen = variants()
    if "zmq" in chosen:
        _use_zmq_transport()
    if "nospin" in chosen:
        os.environ["TEXTGEN_ENGINE_CLASS"] = ENGINE_CLASS
    from service.__main__ import main as service_main

    return service_main(argv)


if __name__ == "__main__":
    sys.exit(main())
