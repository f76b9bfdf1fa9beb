"""The objects alive when a fit starts are kept out of the garbage collector's full collections until it ends.

Why: when training starts a process holds a large, long-lived Python heap (torch, TorchRec, fbgemm,
Lightning, the traced and sharded model). CPython's full (generation 2) collection walks all of it, and it
runs whenever enough objects have survived into the oldest generation since the last one, which Lightning's
per-step bookkeeping reaches during a fit: on the 2-process DLRM benchmark one such collection took 0.40 s
inside a training step (``gc.callbacks`` timing; ``benchmarks/RESULTS.md``, issue 14), and while one rank
pauses the other waits for it at the next collective. ``gc.freeze()`` moves every object alive at fit start
into a permanent generation that collections skip; objects created during the fit are collected as before,
and an object from before that is freed by reference counting is freed as before. ``gc.unfreeze()`` at
teardown hands the frozen objects back to the collector. (Megatron-LM's ``--manual-gc`` answers the same
pauses by taking collections out of the step.)

Nothing is frozen when the collector is disabled or when something else (the user, a launcher) has already
frozen objects: their freeze is theirs to undo.
"""

from __future__ import annotations

import gc


class FrozenHeap:
    """Freezes the heap at :meth:`freeze` (fit start) and unfreezes it at :meth:`release` (teardown)."""

    def __init__(self) -> None:
        self.frozen = False  # whether this object froze the heap and has not released it yet

    def freeze(self) -> None:
        if self.frozen or not gc.isenabled() or gc.get_freeze_count() > 0:
            return
        gc.freeze()
        self.frozen = True

    def release(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
