"""``DynamicIdRemapper``: the hash table of one dynamic embedding table (or one rank's shard of it).

It owns the table state as registered buffers, so ``state_dict`` / ``load_state_dict`` and
``torch.distributed.checkpoint`` save and restore it exactly, and it runs the native kernels
(``torch.ops.lightning_sparse.hash_*``, CPU or CUDA, wherever the state is) or their pure-PyTorch twins
in ``reference.py``.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable, NamedTuple, Optional

import torch
from torch import nn

from lightning_sparse.dynamic import reference
from lightning_sparse.dynamic.config import MAX_REMAP_BATCH, MAX_STEP, DynamicTableConfig, RowInit
from lightning_sparse.dynamic.hashing import shard_rows
from lightning_sparse.dynamic.state import (
    Counter,
    Meta,
    RemapParams,
    TableTensors,
    allocate,
    decay_powers,
    upgrade_state,
)
from lightning_sparse.ops import native_enabled, native_op_for

MAX_BATCH = MAX_REMAP_BATCH  # fewer ids than this per remap call (int32 sketch counters, see config)


class RemapResult(NamedTuple):
    """What one remap call did.

    ``slots``: row of the table for each id (same shape as the ids; global rows, i.e. with this shard's
    row offset); an id that has no slot gets its fallback row, or ``-1`` when the table keeps none
    (``DynamicTableConfig.fallback_rows=0``). ``assigned``: rows that were given to a new id in this
    call; the caller re-initialises their weights and resets their optimizer state before the lookup.
    """

    slots: torch.Tensor
    assigned: torch.Tensor


class DynamicIdRemapper(nn.Module):
    """Maps raw int64 ids to the rows of a fixed-capacity table, with admission, expiry and eviction.

    Args:
        config: the table's policy.
        capacity: rows of this remapper's block of the table; default ``config.capacity`` (use
            :meth:`for_rank` for a shard). The last ``config.block_fallback_rows(...)`` of them are
            fallback rows; the hash table lends the others (``self.capacity`` slots).
        row_offset: first row of the block, added to every row it hands out, so rows are rows of the whole table.

    The state holds only what the configured policy needs (``state.TableTensors``). It is never cast
    (``.half()``, ``.to(dtype)`` leave it alone: stamps, counts and scores must stay exact), but it moves between the host and a CUDA device with the enclosing model
    (``.to("cuda")``, ``.cuda()``, ``.cpu()``); moves to other device types leave it where it is. The
    kernels run where the state is: ids on another device are moved there, and the slots come back on
    the ids' device.
    """

    def __init__(self, config: DynamicTableConfig, capacity: Optional[int] = None, row_offset: int = 0) -> None:
        super().__init__()
        if not isinstance(config, DynamicTableConfig):
            raise TypeError(f"config must be a DynamicTableConfig, got {type(config).__name__}")
        self.config = config
        rows = config.capacity if capacity is None else capacity
        if rows is None:
            raise ValueError("DynamicIdRemapper needs a capacity: set DynamicTableConfig.capacity or pass capacity=")
        self.rows = int(rows)
        #: fallback rows at the end of this block (``row_offset + capacity ...``); 0: unslotted ids get -1
        self.fallback_rows = config.block_fallback_rows(self.rows, config.capacity or self.rows)
        self.capacity = self.rows - self.fallback_rows  # slots the hash table lends
        self.row_offset = int(row_offset)
        for name, tensor in zip(TableTensors._fields, allocate(self.capacity, config)):
            self.register_buffer(name, tensor)
        self.register_buffer("decay_powers", decay_powers(config.score_decay), persistent=False)
        self.params = RemapParams.from_config(config, self.capacity, self.row_offset, self.fallback_rows)

    @classmethod
    def for_rank(cls, config: DynamicTableConfig, rank: int, world_size: int) -> "DynamicIdRemapper":
        """The remapper of ``rank``'s row-wise block; it must see exactly the ids ``shard_of`` gives it."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        offset, rows = shard_rows(config.capacity, world_size)[rank]
        if rows == 0:
            raise ValueError(
                f"DynamicTableConfig.capacity={config.capacity} leaves rank {rank} of {world_size} no rows under "
                f"row-wise sharding; use a capacity that is a multiple of world_size"
            )
        return cls(config, capacity=rows, row_offset=offset)

    def _apply(self, fn, recurse: bool = True):  # see class docstring
        # Where does `fn` send tensors? Ask it with an empty int64 probe, which no dtype cast touches,
        # then move every buffer there in its own dtype.
        probe = fn(torch.empty(0, dtype=torch.int64, device=self.slot_ids.device))
        device = probe.device if isinstance(probe, torch.Tensor) else self.slot_ids.device
        if device.type in ("cpu", "cuda") and device != self.slot_ids.device:
            for name, buffer in self._buffers.items():
                if buffer is not None:
                    self._buffers[name] = buffer.to(device)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint of the earlier layout (int64 counts and steps, float64 scores, every tensor kept
        # whatever the policy) is converted (state.upgrade_state), or refused naming the tensor and why.
        upgrade_state(state_dict, prefix, self.tensors(), self.config)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def device(self) -> torch.device:
        """Where the state is, and so where the kernels run."""
        return self.slot_ids.device

    def tensors(self) -> TableTensors:
        return TableTensors(*(getattr(self, name) for name in TableTensors._fields))

    def remap(self, ids: torch.Tensor, step: int, now: Optional[float] = None) -> RemapResult:
        """Remaps a batch of raw ids at training step ``step`` (wall time ``now``, default: the clock).

        Updates counts, stamps and scores of known ids, admits new ones per the policy (evicting when
        full) and returns their rows. Call it once per table per step with all of that step's ids.
        """
        ids = self._check_ids(ids)
        step = self._check_step(step)
        now = time.time() if now is None else float(now)
        state_ids = ids.to(self.device, torch.int64)
        op = self._op("hash_remap")
        p = self.params
        if op is not None:
            slots, assigned = op(
                state_ids, *self.tensors(), self.decay_powers, step, now,
                p.policy, p.min_count, p.coin_threshold, p.coin_key, p.halve_every, p.slot_offset,
                p.fallback_offset, p.fallback_rows,
            )  # fmt: skip
        else:
            slots, assigned = self._twin(lambda t, powers: reference.remap(state_ids.cpu(), t, powers, step, now, p))
        return RemapResult(slots.to(ids.device), assigned.to(ids.device))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` without admitting, counting or stamping anything (evaluation); an unknown id
        gets its fallback row (-1 without fallback rows)."""
        ids = self._check_ids(ids)
        state_ids = ids.to(self.device, torch.int64)
        op = self._op("hash_lookup")
        p = self.params
        if op is not None:
            slots = op(state_ids, self.slot_ids, self.index, self.row_offset, p.fallback_offset, p.fallback_rows)
        else:
            slots = self._twin(
                lambda t, _: reference.lookup(state_ids.cpu(), t, self.row_offset, p.fallback_offset, p.fallback_rows),
                writes=False,
            )
        return slots.to(ids.device)

    def expire(self, step: int, now: Optional[float] = None) -> torch.Tensor:
        """Frees the slots of ids unseen for longer than the TTL; returns those rows (ascending)."""
        step = self._check_step(step)
        now = time.time() if now is None else float(now)
        expiry = self.config.expiry
        ttl_steps = expiry.ttl_steps or 0
        ttl_seconds = expiry.ttl_seconds or 0.0
        op = self._op("hash_expire")
        if op is not None:
            slots = op(*self.tensors(), step, now, ttl_steps, ttl_seconds)
        else:
            slots = self._twin(lambda t, _: reference.expire(t, step, now, ttl_steps, ttl_seconds))
        return slots.to(self.device) + self.row_offset

    def maybe_expire(self, step: int, now: Optional[float] = None) -> Optional[torch.Tensor]:
        """Runs :meth:`expire` when expiry is configured and ``sweep_every_steps`` have passed since the last."""
        expiry = self.config.expiry
        last = int(self.meta[Meta.LAST_SWEEP_STEP])
        if not expiry.enabled or (last >= 0 and step - last < expiry.sweep_every_steps):
            return None
        return self.expire(step, now)

    def _op(self, name: str) -> Optional[Callable]:
        """The compiled op for the state's device, or None when the twin must run instead."""
        op = native_op_for(name, self.device)
        if op is None and self.device.type != "cpu" and native_enabled() and native_op_for(name, "cpu") is not None:
            warnings.warn(
                f"DynamicIdRemapper state is on {self.device} but lightning_sparse._C was built without CUDA "
                "kernels: running the PyTorch twin on host copies of the state (slow). Rebuild the extension "
                "with a CUDA toolkit (CUDA_HOME set, torch with CUDA): `pip install -e . --no-build-isolation`.",
                stacklevel=3,
            )
        return op

    def _twin(self, run: Callable, writes: bool = True):
        """Runs a twin from ``reference.py`` as ``run(state, decay_powers)``.

        The twin uses host-only calls (``.numpy()``, tensors created without a device), so for state on
        another device it runs on host copies, which are then copied back in place.
        """
        if self.device.type == "cpu":
            return run(self.tensors(), self.decay_powers)
        state = self.tensors()
        host = TableTensors(*(tensor.cpu() for tensor in state))
        result = run(host, self.decay_powers.cpu())
        if writes:
            for tensor, copy in zip(state, host):
                tensor.copy_(copy)
        return result

    def metrics(self) -> dict[str, int]:
        """Table counters: live ids, slots (``capacity``), fallback rows, and the cumulative admission/eviction/expiry counts."""
        values = self.counters.tolist()
        out = {
            "live": self.capacity - int(self.meta[Meta.FREE_COUNT]),
            "capacity": self.capacity,
            "fallback_rows": self.fallback_rows,
        }
        out.update({c.name.lower(): int(values[c]) for c in Counter})
        return out

    @torch.no_grad()
    def init_rows(
        self, weight: torch.Tensor, rows: torch.Tensor, generator: Optional[torch.Generator] = None, row_offset: int = 0
    ) -> None:
        """Re-initialises ``weight[rows - row_offset]`` per ``config.init`` (``row_offset``: first row of ``weight``)."""
        local = rows.to(weight.device, torch.int64) - row_offset
        if local.numel() == 0:
            return
        fresh = torch.empty((local.numel(),) + tuple(weight.shape[1:]), dtype=torch.float32)
        initial_rows(fresh, self.config, generator)
        weight[local] = fresh.to(weight.device, weight.dtype)

    @staticmethod
    @torch.no_grad()
    def reset_rows(states: Iterable[torch.Tensor], rows: torch.Tensor, row_offset: int = 0) -> None:
        """Zeroes rows of per-row optimizer states (e.g. Adagrad's accumulator, row-wise or element-wise)."""
        for state in states:
            local = rows.to(state.device, torch.int64) - row_offset
            state[local] = 0

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, fallback_rows={self.fallback_rows}, row_offset={self.row_offset}, "
            f"eviction={self.config.eviction.value}"
        )

    @staticmethod
    def _check_ids(ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an int64 or int32 tensor, got {getattr(ids, 'dtype', type(ids))}")
        if ids.numel() >= MAX_BATCH:
            raise ValueError(f"a remap call takes fewer than {MAX_BATCH} ids, got {ids.numel()}; split the batch")
        return ids

    @staticmethod
    def _check_step(step: int) -> int:
        step = int(step)
        if not 0 <= step <= MAX_STEP:
            raise ValueError(f"step must be in [0, {MAX_STEP}] (dynamic tables store steps as int32), got {step}")
        return step


@torch.no_grad()
def initial_rows(
    out: torch.Tensor, config: DynamicTableConfig, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Fills ``out`` (rows of a float tensor) with the initial values of newly assigned rows, per ``config.init``."""
    init = config.init
    scale = init.resolved_scale(config.capacity)
    if init.kind == RowInit.UNIFORM:
        out.uniform_(-scale, scale, generator=generator)
    elif init.kind == RowInit.NORMAL:
        out.normal_(0.0, scale, generator=generator)
    else:
        out.zero_()
    return out
