"""Keep the cyclic garbage collector's pauses short in a long-running dispatchd.

A full collection walks every tracked object. With a large market and many stream clients
that is hundreds of thousands of objects and a pause of a quarter of a second, during
which nothing is delivered. Nearly everything that survives a full collection lives as
long as the process (the contract book, the instruction state, open connections), so
:class:`GcPolicy` freezes the survivors after each full collection: later collections walk
only what was created since. Objects freed by reference counting are freed as before; only
reference cycles among frozen objects wait, until the next *sweep* (every ``sweep_s``),
which unfreezes everything and collects once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

log = logging.getLogger("dispatchd.gc")


class GcPolicy:
    """Use as a context manager around the service's lifetime; run :meth:`sweeps` as a task."""

    def __init__(self, *, sweep_s: float) -> None:
        self.sweep_s = sweep_s

    def _after_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()

    def __enter__(self) -> GcPolicy:
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._after_collection)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._after_collection in gc.callbacks:
            gc.callbacks.remove(self._after_collection)
        gc.unfreeze()

    async def sweeps(self) -> None:
        """Every ``sweep_s``: unfreeze, collect everything once, freeze the survivors."""
        while True:
            await asyncio.sleep(self.sweep_s)
            started = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
            log.info("garbage sweep: %d unreachable objects in %.0f ms", found,
                     (time.perf_counter() - started) * 1000)
