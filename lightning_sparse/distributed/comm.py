"""Communication report: the bytes each collective of a training step sends and receives, by table and sharding.

Measured, not modelled: while a :class:`CommunicationCounter` is installed, the ``torch.distributed`` collectives
TorchRec's sharded modules, DDP and lightning_sparse call (``all_to_all_single``, ``reduce_scatter_tensor``,
``reduce_scatter``, ``all_gather_into_tensor``, ``all_gather``, ``all_reduce``, ``broadcast``) are wrapped, and the
payload of each call is counted from its tensors and split sizes before the original runs. TorchRec's comm ops
call these functions (``comm_ops.py``, ``dist_data.py``: ``dist.all_to_all_single``, ``dist.reduce_scatter_tensor``,
...) unless its sync collectives are turned on (``set_use_sync_collectives``, off by default), which this counter
does not see. DDP's bucket all-reduce runs in C++; the counter registers DDP's own default ``allreduce_hook``
as a comm hook (same arithmetic: divide by the world size, all-reduce) so that it goes through ``all_reduce`` too.

Bytes are what leave and reach this rank: a chunk a rank keeps for itself is not counted. ``all_reduce`` counts
its bandwidth-optimal volume, ``2 (W - 1) / W`` of the buffer each way (what a ring or reduce-scatter +
all-gather moves); the others count their payload exactly.

Each call is attributed to a :class:`Channel`: the sharding type and tables of the TorchRec sharding group
that issued it (found on the Python stack: the group's input/output dist modules, or the ``KJTAllToAll``
awaitables of its features), the backward of a group's output dist (a hook on the gradient of the awaited
output tensor), DDP's all-reduce of the dense layers, the all-reduce of a ``data_parallel`` group's gradient
(TorchRec wraps those tables' lookup in a DDP of its own), the dynamic tables' id routing, the row union of
``data_parallel`` tables, or ``other``. TorchRec batches every table of one sharding type into one collective, so a channel names all the
tables of its group (``t_a+t_b``).
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from lightning_sparse.distributed.comm_hint import BatchStats

COLLECTIVES = (
    "all_to_all_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "broadcast",
)
_STACK_DEPTH = 40  # frames searched for the module or awaitable that issued a collective


@dataclass(frozen=True)
class Channel:
    """Who a collective's bytes belong to: ``kind`` (a sharding type, ``dense``, ``dynamic``, ``other``), the
    ``tables`` of the group (``+``-joined; ``ddp`` for dense layers) and the ``phase`` (``input_dist``,
    ``output_dist``, ``output_dist_backward``, ``grad_allreduce``, ``ids``, ``row_union``, or the op)."""

    kind: str
    tables: str
    phase: str

    def key(self) -> str:
        return "/".join(part for part in (self.kind, self.tables, self.phase) if part)


def payload(op: str, bound: dict[str, Any], rank: int, world: int) -> tuple[int, int]:
    """(bytes sent, bytes received) by this rank in one call of collective ``op`` with arguments ``bound``."""

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    if op == "all_to_all_single":
        out, inp = bound["output"], bound["input"]
        return _a2a_part(inp, bound.get("input_split_sizes"), rank, world), _a2a_part(
            out, bound.get("output_split_sizes"), rank, world
        )
    if op == "reduce_scatter_tensor":
        return nbytes(bound["input"]) * (world - 1) // world, nbytes(bound["output"]) * (world - 1)
    if op == "reduce_scatter":
        sent = sum(nbytes(t) for i, t in enumerate(bound["input_list"]) if i != rank)
        return sent, nbytes(bound["output"]) * (world - 1)
    if op == "all_gather_into_tensor":
        return nbytes(bound["input_tensor"]) * (world - 1), nbytes(bound["output_tensor"]) * (world - 1) // world
    if op == "all_gather":
        received = sum(nbytes(t) for i, t in enumerate(bound["tensor_list"]) if i != rank)
        return nbytes(bound["tensor"]) * (world - 1), received
    if op == "all_reduce":
        volume = 2 * nbytes(bound["tensor"]) * (world - 1) // world
        return volume, volume
    if op == "broadcast":
        source = bound.get("src")
        source = bound.get("group_src") if source is None else source
        mine = nbytes(bound["tensor"])
        return (mine * (world - 1), 0) if source == rank else (0, mine)
    raise ValueError(f"no payload rule for collective {op!r}")


def _a2a_part(tensor: torch.Tensor, splits: Optional[list[int]], rank: int, world: int) -> int:
    """Bytes of ``tensor`` in the chunks of other ranks (splits along dim 0; equal chunks without splits)."""
    total = tensor.numel() * tensor.element_size()
    if tensor.dim() == 0 or tensor.size(0) == 0:
        return 0
    row = total // tensor.size(0)
    own = splits[rank] if splits else tensor.size(0) // world
    return total - int(own) * row


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    calls: int = 0


class CommunicationCounter:
    """Counts the bytes of every collective issued while installed, per :class:`Channel`.

    Call :meth:`install` once (it wraps ``torch.distributed``'s collectives in this process), :meth:`attach` the
    sharded model, :meth:`start_step` / :meth:`end_step` around each training step; :meth:`report` gives the
    mean per counted step and the last step. Collectives outside steps (validation, checkpoints) are ignored.
    """

    def __init__(self) -> None:
        self._originals: dict[tuple[Any, str], Callable] = {}
        self._labels: dict[int, Union[Channel, Callable[[Any], Optional[Channel]]]] = {}
        self._feature_channel: dict[str, Channel] = {}
        self._sharded: list[tuple[nn.Module, dict[str, str]]] = []
        self._local = threading.local()
        self._backward_pending: Optional[Channel] = None
        self._step: Optional[dict[Channel, Traffic]] = None
        self.last_step: dict[Channel, Traffic] = {}
        self.total: dict[Channel, Traffic] = defaultdict(Traffic)
        self.steps = 0
        self.batch_stats = BatchStats()
        self._rows: dict[str, int] = {}  # static tables whose batches feed the planner hint
        self._feature_to_table: dict[str, str] = {}

    # ------------------------------------------------------------ install
    def install(self) -> None:
        """Wraps the collectives of ``torch.distributed`` (and its ``distributed_c10d`` module, which helpers
        such as ``all_gather_object`` call directly)."""
        from torch.distributed import distributed_c10d

        if self._originals:
            return
        for module in (dist, distributed_c10d):
            for op in COLLECTIVES:
                original = getattr(module, op)
                self._originals[(module, op)] = original
                setattr(module, op, self._wrap(op, original))

    def uninstall(self) -> None:
        for (module, op), original in self._originals.items():
            setattr(module, op, original)
        self._originals.clear()

    def _wrap(self, op: str, original: Callable) -> Callable:
        signature = inspect.signature(original)

        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if self._step is not None and depth == 0:
                self._count(op, signature.bind(*args, **kwargs).arguments, sys._getframe(1))
            self._local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = depth

        counted.__wrapped__ = original  # type: ignore[attr-defined]
        return counted

    # -------------------------------------------------------- attribution
    def attach(self, model: nn.Module, feature_to_table: dict[str, str], rows: Optional[dict[str, int]] = None) -> None:
        """Knows ``model``'s TorchRec sharded collections (their dist modules are indexed lazily: TorchRec
        creates input dists at the first forward) and the rows of the tables whose batches :meth:`count_batch`
        adds to ``batch_stats`` (the planner hint, ``distributed/comm_hint.py``)."""
        self._feature_to_table, self._rows = dict(feature_to_table), dict(rows or {})
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        for module in model.modules():
            if isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)):
                self._sharded.append((module, feature_to_table))
        self._index()

    def data_parallel_lookups(self) -> list[tuple[Channel, nn.Module]]:
        """The DDP modules TorchRec wraps around the lookups of data_parallel sharding groups (held in a plain
        list, so ``modules()`` does not reach them), with the channel of their gradients' all-reduce."""
        from torch.nn.parallel import DistributedDataParallel

        found = []
        for module, feature_to_table in self._sharded:
            types = getattr(module, "_sharding_types", None) or list(module._sharding_type_to_sharding)
            for sharding_type, sharding, lookup in zip(types, module._embedding_shardings, module._lookups):
                if isinstance(lookup, DistributedDataParallel):
                    tables = "+".join(sorted({feature_to_table.get(f, f) for f in sharding.feature_names()}))
                    found.append((Channel(sharding_type, tables, "grad_allreduce"), lookup))
        return found

    def label(self, obj: Any, channel: Union[Channel, Callable[[Any], Optional[Channel]]]) -> None:
        """Attributes collectives issued while a method of ``obj`` is on the stack to ``channel`` (or to what
        ``channel(frame)`` returns, e.g. from the frame's local variables)."""
        self._labels[id(obj)] = channel

    def _index(self) -> None:
        for module, feature_to_table in self._sharded:
            types = getattr(module, "_sharding_types", None) or list(module._sharding_type_to_sharding)
            for i, (sharding_type, sharding) in enumerate(zip(types, module._embedding_shardings)):
                features = list(sharding.feature_names())
                tables = "+".join(sorted({feature_to_table.get(f, f) for f in features}))
                for phase, dists in (("input_dist", module._input_dists), ("output_dist", module._output_dists)):
                    if i < len(dists) and id(dists[i]) not in self._labels:
                        channel = Channel(sharding_type, tables, phase)
                        for sub in dists[i].modules():
                            self._labels[id(sub)] = channel
                        if phase == "output_dist":
                            dists[i].register_forward_hook(
                                self._tag_output(Channel(sharding_type, tables, "output_dist_backward"))
                            )
                for feature in features:
                    self._feature_channel.setdefault(feature, Channel(sharding_type, tables, "input_dist"))

    def _tag_output(self, channel: Channel) -> Callable:
        """A forward hook on an output dist: its awaitable's result gets a gradient pre-hook that names the
        next collective (the output dist's backward) after ``channel``."""

        def mark(_: Any) -> None:
            self._backward_pending = channel

        def tag(result: Any) -> Any:
            if isinstance(result, torch.Tensor) and result.grad_fn is not None:
                result.grad_fn.register_prehook(lambda grads: mark(grads))
            return result

        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            callbacks = getattr(output, "callbacks", None)
            if callbacks is not None:
                callbacks.append(tag)
            return output

        return hook

    def _channel_from_stack(self, frame: Any) -> Optional[Channel]:
        for _ in range(_STACK_DEPTH):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if owner is not None:
                found = self._labels.get(id(owner))
                if callable(found):
                    found = found(frame)
                if found is not None:
                    return found
                keys = getattr(owner, "_keys", None)
                if isinstance(keys, list) and keys and keys[0] in self._feature_channel:
                    return self._feature_channel[keys[0]]
            frame = frame.f_back
        return None

    @contextmanager
    def scope(self, shares: list[tuple[Channel, int]]) -> Iterator[None]:
        """Attributes the collective issued inside to ``shares``: (channel, bytes of the buffer that is its)."""
        self._local.shares = shares
        try:
            yield
        finally:
            self._local.shares = None

    def _count(self, op: str, bound: dict[str, Any], frame: Any) -> None:
        group = bound.get("group")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world <= 1:
            return
        sent, received = payload(op, bound, rank, world)
        shares = getattr(self._local, "shares", None)
        if shares:
            total = sum(n for _, n in shares) or 1
            for channel, n in shares:
                self._add(channel, sent * n // total, received * n // total)
            return
        channel = self._channel_from_stack(frame)
        if channel is None and len(self._labels) < 10_000:
            self._index()  # input dists created since the last index (TorchRec builds them at the first forward)
            channel = self._channel_from_stack(frame)
        if channel is None and self._backward_pending is not None:
            channel, self._backward_pending = self._backward_pending, None
        self._add(channel or Channel("other", "", op), sent, received)

    def _add(self, channel: Channel, sent: int, received: int) -> None:
        traffic = self._step[channel]
        traffic.sent += sent
        traffic.received += received
        traffic.calls += 1

    # ---------------------------------------------------------------- DDP
    def ddp_hook(self, state: Any, bucket: dist.GradBucket, channel: Optional[Channel] = None) -> torch.futures.Future:
        """DDP's default all-reduce (``allreduce_hook``: divide by the world size, all-reduce), its bytes given to
        ``channel``: the dense layers, or the group of data_parallel tables whose own DDP TorchRec built."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        with self.scope([(channel or Channel("dense", "ddp", "grad_allreduce"), 1)]):
            return allreduce_hook(state, bucket)

    # -------------------------------------------------------------- steps
    def count_batch(self, batch: Any) -> None:
        """Adds a training batch's KeyedJaggedTensors to ``batch_stats`` (samples, ids, ids outside the row block)."""
        from lightning_utilities.core.apply_func import apply_to_collection
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        add = lambda kjt: self.batch_stats.add(kjt, self._feature_to_table, self._rows, rank, world)  # noqa: E731
        apply_to_collection(batch, KeyedJaggedTensor, add)
        self.batch_stats.steps += 1

    def start_step(self) -> None:
        self._step = defaultdict(Traffic)
        self._backward_pending = None

    def end_step(self) -> None:
        if self._step is None:
            return
        self.last_step = dict(self._step)
        for channel, traffic in self._step.items():
            total = self.total[channel]
            total.sent += traffic.sent
            total.received += traffic.received
            total.calls += traffic.calls
        self.steps += 1
        self._step = None

    def report(self) -> "CommunicationReport":
        return CommunicationReport(self.steps, dict(self.total), dict(self.last_step), self.batch_stats)


@dataclass
class CommunicationReport:
    """This rank's traffic: ``total`` over ``steps`` counted training steps, the ``last_step``'s, and the
    ``batch_stats`` of its training batches (for :func:`~lightning_sparse.distributed.comm_hint.sharding_hint`)."""

    steps: int
    total: dict[Channel, Traffic]
    last_step: dict[Channel, Traffic]
    batch_stats: BatchStats = field(default_factory=BatchStats)

    def per_step(self) -> dict[str, tuple[float, float]]:
        """Channel key -> (mean bytes sent, mean bytes received) per step."""
        n = max(self.steps, 1)
        return {
            channel.key(): (t.sent / n, t.received / n)
            for channel, t in sorted(self.total.items(), key=lambda kv: kv[0].key())
        }

    def by_kind(self) -> dict[str, tuple[float, float]]:
        """(sent, received) per step summed by sharding type / ``dense`` / ``dynamic`` / ``other``."""
        out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        n = max(self.steps, 1)
        for channel, t in self.total.items():
            out[channel.kind][0] += t.sent / n
            out[channel.kind][1] += t.received / n
        return {k: (v[0], v[1]) for k, v in sorted(out.items())}

    def as_metrics(self, last_step: bool = True) -> dict[str, float]:
        """``comm/<kind>/<tables>/sent_bytes`` and ``received_bytes`` per channel (phases summed), and
        ``comm/total/...``: this rank's bytes in the last step (or the mean per step)."""
        source = (
            self.last_step
            if last_step
            else {
                c: Traffic(t.sent / max(self.steps, 1), t.received / max(self.steps, 1)) for c, t in self.total.items()
            }
        )
        metrics: dict[str, float] = defaultdict(float)
        for channel, t in source.items():
            prefix = "/".join(p for p in ("comm", channel.kind, channel.tables) if p)
            metrics[f"{prefix}/sent_bytes"] += t.sent
            metrics[f"{prefix}/received_bytes"] += t.received
            metrics["comm/total/sent_bytes"] += t.sent
            metrics["comm/total/received_bytes"] += t.received
        return dict(metrics)

    def format(self) -> str:
        """A table: one row per channel with KiB sent and received per step and calls per step."""
        n = max(self.steps, 1)
        rows = [f"{'channel':<52}{'sent KiB/step':>15}{'recv KiB/step':>15}{'calls/step':>12}"]
        for channel, t in sorted(self.total.items(), key=lambda kv: kv[0].key()):
            rows.append(
                f"{channel.key():<52}{t.sent / n / 1024:>15.2f}{t.received / n / 1024:>15.2f}{t.calls / n:>12.1f}"
            )
        return "\n".join(rows)


def communication_counter(
    dmp: nn.Module, tables: Any, dynamic: Any = None, sparse_optimizer: Any = None
) -> CommunicationCounter:
    """The counter of a sharded model, built once per DistributedModelParallel (later stages reuse it): wraps
    the collectives, indexes the sharded collections, labels the dynamic tables' id routing and the
    data-parallel row union, and registers the counting all-reduce hook on the DDP of the dense layers."""
    from torch.nn.parallel import DistributedDataParallel

    from lightning_sparse.optim.native_kernel_optimizer import NativeKernelOptimizer

    existing = getattr(dmp, "_lightning_sparse_comm", None)
    if existing is not None:
        existing.install()
        return existing
    counter = CommunicationCounter()
    counter.install()
    static_rows = {name: table.rows for name, table in tables.tables.items() if table.dynamic is None}
    counter.attach(dmp, dict(tables.features), static_rows)
    if dynamic is not None:
        counter.label(dynamic, lambda frame: Channel("dynamic", str(frame.f_locals.get("table", "")), "ids"))
    for _, optimizer in getattr(sparse_optimizer, "optimizers", []):
        if isinstance(optimizer, NativeKernelOptimizer):  # our kernels: the row union of data_parallel tables
            counter.label(optimizer, lambda frame: _row_union_channel(frame))
    # a lambda: DDP checks a hook's annotations, which are strings under ``from __future__ import annotations``
    for module in dmp.modules():
        if isinstance(module, DistributedDataParallel):
            module.register_comm_hook(None, lambda state, bucket: counter.ddp_hook(state, bucket))
    for channel, ddp in counter.data_parallel_lookups():  # TorchRec wraps each group of them in a DDP of its own
        ddp.register_comm_hook(None, lambda state, bucket, channel=channel: counter.ddp_hook(state, bucket, channel))
    object.__setattr__(dmp, "_lightning_sparse_comm", counter)
    return counter


def _row_union_channel(frame: Any) -> Optional[Channel]:
    table = frame.f_locals.get("table")
    return Channel("data_parallel", getattr(table, "name", ""), "row_union")
