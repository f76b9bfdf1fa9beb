"""The cached tables of a sharded model: set-up, the per-step window, remapping and checkpoints.

Before planning, each cached table is shrunk to its scratchpad (``distributed/cached_tables.py``), so TorchRec
plans and builds a TBE of ``C`` rows; its full-size initialisation is kept aside. :meth:`CachedTables.build`
runs in ``ShardedModel.build`` once the native optimizer exists: the rank holding the table gets a backing
store filled from that initialisation (any kind: host weight, recorded draw, ``init_fn``, pretrained file)
and fresh optimizer state, and the scratchpad tensors (the TBE's weights and the optimizer's state) are
handed to a :class:`CachedTable`.

Each step, the :class:`~lightning_sparse.cache.prefetch.LookaheadLoader` has already read the next ``K``
batches (``CacheConfig.horizon``); :meth:`before_training_step` gathers every rank's ids of the batches read
(one ``all_gather``), plans the batch ``k`` steps ahead with the batches after it up to ``K`` as the
planner's ``ahead``, and replaces this batch's ids by slots. :class:`CachedTables` is ``Stateful``: :meth:`state_dict` writes dirty
slots back and returns the backing stores and the planners; :meth:`load_state_dict` takes them (read in
place by the checkpoint), and the next pass over the train loader resumes the checkpoint's: every row sits
in the slot it had (the scratchpads are loaded with the model and the optimizer), so a run resumed in the
middle of a pass copies the same rows as the run that went on.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Mapping

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.cache.backing import BackingStore, host_store, mmap_store
from lightning_sparse.cache.lookahead import WorkingSetTooLarge
from lightning_sparse.cache.scratchpad import CachedTable
from lightning_sparse.config import CacheBacking, CacheConfig, ResolvedTable
from lightning_sparse.dynamic.kjt import split_by_key, values_of, with_slots
from lightning_sparse.optim.kernels import init_state_for
from lightning_sparse.optim.native_kernel_optimizer import NativeKernelOptimizer, _on_rank

GLOBAL_STATE = ("step",)  # optimizer state of a whole table, not per row: it stays with the scratchpad
_CHUNK_ROWS = 1 << 16  # the backing store is filled in chunks: it may be larger than RAM
GatherObjects = Callable[[Any], list]  # every rank's object, in rank order (Collectives.all_gather_object)
FillRows = Callable[[ResolvedTable, Tensor, int, int], None]  # rows [row, ...) x columns [col, ...) of a table's init


class CachedTables:
    """Every cached table of a sharded model on this rank (see the module docstring); ``Stateful``."""

    def __init__(
        self, configs: dict[str, CacheConfig], rows: dict[str, int], rank: int, gather_objects: GatherObjects
    ) -> None:
        self.configs = configs
        self.rows = rows  # table -> N, the rows its ids range over
        self.rank = rank
        self._gather_objects = gather_objects
        self.owners: dict[str, int] = {}
        self.tables: dict[str, CachedTable] = {}
        self.feature_to_table: dict[str, str] = {}
        self._read: deque[dict[str, Tensor]] = deque()  # this rank's ids of batches read and not yet gathered
        self._gathered: dict[int, dict[str, Tensor]] = {}  # batch of this pass -> all ranks' ids per table
        self._step = 0  # training steps of this pass
        self._planned: dict[str, int] = {}  # table -> last batch of this pass in its window
        self._last_seq = -1  # the planners' batch numbers grow across passes; this pass's start at _pass_start
        self._pass_start = 0
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._resume: "Tensor | None" = None  # a checkpoint's progress, taken by the next pass (load_state_dict)

    # -------------------------------------------------------------- set-up
    @classmethod
    def build(
        cls,
        tables: Any,
        optimizer: NativeKernelOptimizer,
        owners: Mapping[str, int],
        rank: int,
        gather_objects: GatherObjects,
        fill: FillRows,
        device: torch.device,
    ) -> "CachedTables":
        """The cached tables of a freshly sharded model (``tables``: its ``EmbeddingTables``): backing stores on the
        rank holding each table, filled by ``fill`` from ``tables.cache_sources`` (released here), bound to the
        native optimizer's tensors."""
        sources = tables.cache_sources
        cache = cls(
            {name: source.cache for name, source in sources.items()},
            {name: source.rows for name, source in sources.items()},
            rank,
            gather_objects,
        )
        for name, config in sorted(cache.configs.items()):
            table = tables.tables[name]
            cache.owners[name] = int(owners[name])
            cache.feature_to_table.update({f: name for f, t in tables.features.items() if t == name})
            fresh = init_state_for(table.optimizer, torch.zeros(1, table.dim))
            cache._shapes[name] = {"weight": (cache.rows[name], table.dim)}
            cache._shapes[name].update(
                {k: (cache.rows[name], *v.shape[1:]) for k, v in fresh.items() if k not in GLOBAL_STATE}
            )
            scratch = store = None
            if cache.owners[name] == rank:
                weight, state = optimizer.table_tensors(name)
                scratch = {"weight": weight, **{k: v for k, v in state.items() if k not in GLOBAL_STATE}}
                store = cache._new_store(sources[name], config, scratch, device, fill)
            cache.tables[name] = CachedTable(name, cache.rows[name], table.rows, scratch, store, config.score_decay)
        sources.clear()
        cache._start_pass()
        return cache

    def _new_store(
        self,
        source: ResolvedTable,
        config: CacheConfig,
        scratch: dict[str, Tensor],
        device: torch.device,
        fill: FillRows,
    ) -> BackingStore:
        n = self.rows[source.name]
        shapes = self._shapes[source.name]
        if set(shapes) != set(scratch):
            raise RuntimeError(
                f"cached table {source.name!r}: scratchpad state {sorted(scratch)} != expected {sorted(shapes)}"
            )
        backing = config.backing
        if backing is CacheBacking.AUTO:
            backing = CacheBacking.HOST if device.type == "cuda" else CacheBacking.MMAP
        if backing is CacheBacking.HOST:
            store = host_store(shapes, pin=device.type == "cuda")
        else:
            store = mmap_store(shapes, config.path, f"{source.name}.rank{self.rank}")
        fresh = init_state_for(source.optimizer, torch.zeros(1, source.dim))
        with torch.no_grad():
            for start in range(0, n, _CHUNK_ROWS):
                end = min(n, start + _CHUNK_ROWS)
                fill(source, store.tensors["weight"][start:end], start, 0)  # the table's initialisation, any kind
                for key, value in fresh.items():
                    if key in store.tensors:
                        store.tensors[key][start:end].copy_(value.expand_as(store.tensors[key][start:end]))
        store.flush()
        return store

    # ---------------------------------------------------------- the window
    def new_pass(self) -> None:
        """A new pass over the train loader: batches read ahead in the last one will not be trained. After a
        checkpoint was loaded, the pass resumes it: the loader starts at the checkpoint's next batch, and the
        batches it reads first were planned before the checkpoint (their rows are in the restored scratchpad)."""
        self.wait()
        self._read.clear()
        if self._resume is not None:
            progress, self._resume = self._resume.tolist(), None
            self._pass_start, self._last_seq = progress[0], progress[1]
            self._start_pass()
            for name, planned in zip(sorted(self.tables), progress[2:]):
                self._planned[name] = planned - self._pass_start
            return
        for table in self.tables.values():
            table.planner.window.clear()
        self._pass_start = self._last_seq + 1
        self._start_pass()

    def _start_pass(self) -> None:
        self._read.clear()
        self._gathered.clear()
        self._step = 0
        self._planned = dict.fromkeys(self.tables, -1)

    def on_batch_read(self, batch: Any) -> None:
        """The look-ahead loader read ``batch``: its cached tables' ids join the queue (this rank's)."""
        ids: dict[str, list[Tensor]] = {}

        def collect(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
            for name in self.tables:
                keys = self._keys(kjt, name)
                if keys:
                    ids.setdefault(name, []).append(values_of(kjt, keys).detach().cpu())
            return kjt

        apply_to_collection(batch, KeyedJaggedTensor, collect)
        self._read.append({name: self._valid(name, torch.cat(parts)) for name, parts in ids.items()})

    def _valid(self, name: str, ids: Tensor) -> Tensor:
        # ids outside the table are the input checks' to report (or drop); they never get a slot
        return ids[(ids >= 0) & (ids < self.rows[name])]

    def _keys(self, kjt: KeyedJaggedTensor, table: str) -> list[str]:
        return [key for key in kjt.keys() if self.feature_to_table.get(key) == table]

    def wait(self) -> None:
        for table in self.tables.values():
            table.wait()

    def before_training_step(self, batch: Any) -> Any:
        """Plans each table's window up to ``k`` batches ahead of this step's and returns the batch with slots."""
        self.wait()
        step = self._step
        horizon = step + max(cfg.batches_ahead for cfg in self.configs.values())
        first = max(self._gathered, default=step - 1) + 1
        local = [self._read.popleft() for _ in range(min(horizon + 1 - first, len(self._read)))]
        gathered = self._gather_objects(local)
        for i in range(min(len(part) for part in gathered)):
            self._gathered[first + i] = {
                name: torch.unique(torch.cat([part[i].get(name, _EMPTY) for part in gathered])) for name in self.tables
            }
        if step not in self._gathered:
            raise RuntimeError(
                "cached tables: this training step's batch was not read by the look-ahead loader. SparseStrategy "
                "installs it on the train loader (process_dataloader); do not iterate that loader elsewhere."
            )
        for name, table in self.tables.items():
            table.planner.retire(self._pass_start + step - 1)
            loaded_now = 0
            for seq in range(
                self._planned[name] + 1, min(step + self.configs[name].lookahead, max(self._gathered)) + 1
            ):
                try:
                    moves = table.plan(self._pass_start + seq, self._gathered[seq][name], self._ahead(name, seq, step))
                except WorkingSetTooLarge as error:
                    raise WorkingSetTooLarge(
                        f"{error} (batch {self._pass_start + seq} is batch {seq} of this pass over "
                        f"the train loader, planned before the pass's step {step})"
                    ) from None
                self._last_seq = max(self._last_seq, self._pass_start + seq)
                self._planned[name] = seq
                if seq == step:
                    loaded_now = int(moves.load_rows.numel())
                    table.wait()  # this batch's own rows are being copied: the lookup needs them
            table.mark_trained(self._gathered[step][name])
            distinct = int(self._gathered[step][name].numel())
            table.counters["lookups"] += distinct
            table.counters["hits"] += distinct - loaded_now
        del self._gathered[step]
        self._step += 1
        return apply_to_collection(batch, KeyedJaggedTensor, self._remap)

    def _ahead(self, name: str, seq: int, step: int) -> list[tuple[int, Tensor]]:
        """``(batch, rows)`` of the batches after ``seq`` read by step ``step``'s horizon (all ranks' ids, unique):
        the same on every rank, and in a resumed run the same as in the run that went on."""
        last = min(step + self.configs[name].batches_ahead, max(self._gathered, default=-1))
        return [(self._pass_start + s, self._gathered[s][name]) for s in range(seq + 1, last + 1)]

    def before_evaluation_step(self, batch: Any) -> Any:
        """Copies an evaluation batch's missing rows in (all ranks' ids) and returns it with slots."""
        self.wait()
        ids: dict[str, list[Tensor]] = {}

        def collect(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
            for name in self.tables:
                keys = self._keys(kjt, name)
                if keys:
                    ids.setdefault(name, []).append(self._valid(name, values_of(kjt, keys).detach().cpu()))
            return kjt

        apply_to_collection(batch, KeyedJaggedTensor, collect)
        gathered = self._gather_objects({name: torch.cat(parts) for name, parts in ids.items()})
        for name, table in self.tables.items():
            ahead = self._ahead(name, self._planned[name], self._step)
            table.plan(max(self._last_seq, 0), torch.cat([part.get(name, _EMPTY) for part in gathered]), ahead)
            table.planner.window.pop()  # an evaluation batch holds no slot beyond its own lookup
            table.wait()
        return apply_to_collection(batch, KeyedJaggedTensor, self._remap)

    def _remap(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        slots_by_key = {}
        for name, table in self.tables.items():
            keys = self._keys(kjt, name)
            if keys:
                slots_by_key.update(split_by_key(kjt, keys, table.lookup(values_of(kjt, keys))))
        return with_slots(kjt, slots_by_key) if slots_by_key else kjt

    # --------------------------------------------------------- checkpoints (Stateful)
    def state_dict(self) -> dict[str, Any]:
        """The backing stores, dirty slots written back first: ``<table>.<weight|state>`` [N, ...] tensors,
        each a ShardedTensor of one shard on the rank holding the table (meta templates on the others); each
        table's planner (``<table>.planner.<name>``, the same on every rank); and ``progress``: the pass's
        next batch, the last batch planned, and each table's last batch planned. With them a run resumed in
        the middle of a pass places every row in the same slot as the run that wrote the checkpoint."""
        state: dict[str, Any] = {}
        rank = self.rank
        for name, table in sorted(self.tables.items()):
            table.flush()
            for key, tensor in self._store_templates(name, table).items():
                device = tensor.device if tensor.device.type != "meta" else torch.device("cpu")
                state[f"{name}.{key}"] = _on_rank(tensor, self.owners[name], rank if table.holds_rows else -1, device)
            for key, tensor in table.planner.state().items():
                state[f"{name}.planner.{key}"] = tensor
        planned = [self._pass_start + self._planned[name] for name in sorted(self.tables)]
        state["progress"] = torch.tensor([self._pass_start + self._step, self._last_seq, *planned], dtype=torch.int64)
        return state

    def _store_templates(self, name: str, table: CachedTable) -> dict[str, Tensor]:
        if table.store is not None:
            return table.store.tensors
        return {key: torch.empty(shape, device="meta") for key, shape in self._shapes[name].items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Takes the backing stores and planners of a checkpoint, read in place into :meth:`state_dict`'s tensors
        (tensors of its own are copied in); the scratchpads were loaded with the model and the optimizer, and
        hold no dirty row (the checkpoint wrote them back). The next pass resumes the checkpoint's."""
        for name, table in self.tables.items():
            table.wait()
            table.dirty.zero_()
            table.planner.load_state({key: state_dict[f"{name}.planner.{key}"] for key in table.planner.state()})
            if table.store is None:
                continue
            for key, tensor in table.store.tensors.items():
                loaded = state_dict[f"{name}.{key}"]
                local = loaded.local_shards()[0].tensor if hasattr(loaded, "local_shards") else loaded
                if local.data_ptr() != tensor.data_ptr():
                    with torch.no_grad():
                        tensor.copy_(local)
            table.store.flush()
        self._start_pass()
        self._resume = state_dict["progress"].clone()

    # ------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """``cache/<table>/...`` of the steps since the last call: hit rate at lookup, rows in and back, bytes."""
        out = {}
        for name, table in sorted(self.tables.items()):
            c = table.take_counters()
            out[f"cache/{name}/hit_rate"] = c["hits"] / c["lookups"] if c["lookups"] else 1.0
            out[f"cache/{name}/rows_in"] = float(c["rows_in"])
            out[f"cache/{name}/rows_back"] = float(c["rows_back"])
            out[f"cache/{name}/bytes_moved"] = float(c["bytes_moved"])
        return out


_EMPTY = torch.empty(0, dtype=torch.int64)
