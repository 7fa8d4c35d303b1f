"""service.process.heap: start-up's objects leave the collector's reach, young collections are rarer."""

from __future__ import annotations

import gc

from service.process.heap import GEN0_THRESHOLD, freeze_startup_heap


def test_freeze_startup_heap_freezes_survivors_and_raises_the_first_threshold():
    before = gc.get_threshold()
    kept = [{"startup": i} for i in range(1000)]  # long-lived containers made before serving
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert gc.get_threshold() == (GEN0_THRESHOLD, before[1], before[2])
        scanned = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
        assert not any(id(x) in scanned for x in kept)  # no generation the collector walks holds them
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
