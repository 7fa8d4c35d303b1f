"""Garbage collection in the serving processes: what start-up made is frozen, young collections are rarer.

CPython's cyclic collector stops the process it runs in. After start-up an HTTP process or the
inference worker holds hundreds of thousands of long-lived objects (modules, the tokenizer, the
routes, the engine); a collection of an older generation walks them all, a pause of milliseconds
in the middle of a stream (one generation-1 collection in an HTTP process took 2.7 ms here).
``gc.freeze()`` moves them to a generation the collector never scans. The first generation is
collected after 10× more new container objects than CPython's default (700): objects of a request
mostly die by reference counting, so collections are rare and each stays short.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 7000


def freeze_startup_heap() -> None:
    """Call once, when the process is ready to serve: collect, then freeze what survives."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
