"""Python's cycle collector paused while a plan loads a large catalogue.

Reading 100,000 catalogue rows builds some 500,000 small objects (tuples, strings, entries, parsed JSON),
none of them in a reference cycle. Each 700 new objects start a young collection, and every tenth of those
an older one, so CPython's cyclic GC walks the growing heap again and again: 0.6-1.7 s of a 4 s no-op plan
at 100,000 volumes (``benchmarks/scale.py``). :func:`paused_gc` turns the collector off for such a stretch
and back on after it (reference counting still frees everything at once); nested uses keep it off until
the outermost ends, and a collector that was already off stays off.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Within the block the cyclic garbage collector does not run (see the module doc); usable as a decorator
    through :func:`contextlib.contextmanager`'s ``ContextDecorator``."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
