"""Typed configuration of a dynamic (hash-backed) embedding table.

One dataclass per concept (admission, expiry, row initialisation, the table), shared by the Python API,
the CLI and YAML. Every field is validated on construction and a bad value is rejected with an error
that names the field and the allowed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from lightning_sparse.typed_config import NamedEnum, build_dataclass

# This module imports only ``typed_config`` from lightning_sparse, so ``lightning_sparse/config.py`` can
# import it to add a ``dynamic`` field to its per-table config without an import cycle.

#: Largest ``sketch_halve_every`` and largest remap batch. A counter halved at value ``c`` restarts at
#: ``c / 2`` and gains at most ``halve_every + batch`` before the next halving, so it stays below
#: ``2 * (2**28 + 2**28) = 2**30``: int32 sketch counters cannot overflow.
MAX_SKETCH_HALVE_EVERY = 1 << 28
MAX_REMAP_BATCH = 1 << 28
#: Largest training step a dynamic table accepts: last-seen steps are stored as int32 (4 bytes per slot).
MAX_STEP = (1 << 31) - 1


class EvictionPolicy(NamedEnum):
    """Which live id loses its slot when the table is full and an admitted id needs one.

    ``lfu``: lowest occurrence count. ``lru``: oldest last-seen step. ``feature_score``: lowest
    Kraken-style score, the occurrence count decayed by ``score_decay`` per step since it was last seen.
    ``distance_lfu``: lowest ``count / (steps since last seen + 1)``, the rule of TorchRec's
    ``DistanceLFU_EvictionPolicy`` (decay exponent 1); it needs no score per slot (4 bytes less).
    """

    LFU = "lfu"
    LRU = "lru"
    FEATURE_SCORE = "feature_score"
    DISTANCE_LFU = "distance_lfu"


class HashPlacement(NamedEnum):
    """Where a dynamic table's hash table lives when the strategy shards the table over several ranks.

    ``sharded``: the hash table is split into one partition per row block of the table's shards, kept on
    the rank that holds that block (for table_wise and column_wise tables: one partition, next to the
    first shard). Each raw id is routed by hash to its partition's rank, which admits, evicts and
    remaps it and sends the row back; memory and remap work are spread with the rows.
    ``replicated``: every rank keeps a full replica and remaps the all-gathered global batch; simplest,
    and its checkpoints load at any world size, but every rank holds and updates all of the metadata.
    """

    SHARDED = "sharded"
    REPLICATED = "replicated"


class RowInit(NamedEnum):
    """How the embedding row of a newly (re)assigned slot is initialised."""

    UNIFORM = "uniform"
    NORMAL = "normal"
    ZEROS = "zeros"


def _check_int(owner: str, name: str, value: object, minimum: int, maximum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{owner}.{name} must be >= {minimum}{upper}, got {value}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass
class AdmissionConfig:
    """When an id that has no slot yet is given one.

    An unadmitted id is eligible when (a) its estimated frequency reaches ``min_count`` and (b) it wins a
    Bernoulli(``probability``) trial. Frequencies of unadmitted ids live in a count-min sketch
    (``sketch_depth`` x ``sketch_width`` int32 counters), so memory stays bounded however many distinct
    ids arrive; without a sketch (depth 0) an id's frequency is its count in the current batch; all counters are halved every ``sketch_halve_every`` recorded occurrences (TinyLFU
    aging), so ids that were frequent long ago do not stay eligible forever. The trial's coin is a hash of
    (id, ``seed``, step): one trial per step in which the id appears, reproducible across ranks and
    restarts without any random-generator state.

    Args:
        min_count: occurrences (sketch estimate, never an under-count) needed before admission; 1 admits
            on first sight.
        probability: admission probability per step in which an eligible id appears, in (0, 1].
        seed: seed of the admission coin.
        sketch_depth: rows of the count-min sketch (independent hashes); more rows, fewer over-counts.
            Default (:meth:`resolved_depth`): 0, no sketch, when ``min_count`` is 1 and the eviction is
            ``distance_lfu`` or ``lru`` (the sketch's memory buys rows instead); 4 otherwise.
        sketch_width: counters per row, a power of two; default: half the table capacity rounded up to
            a power of two (at least 64).
        sketch_halve_every: occurrences recorded between two halvings; default ``10 * sketch_width``.
    """

    min_count: int = 1
    probability: float = 1.0
    seed: int = 0
    sketch_depth: Optional[int] = None
    sketch_width: Optional[int] = None
    sketch_halve_every: Optional[int] = None

    def __post_init__(self) -> None:
        _check_int("AdmissionConfig", "min_count", self.min_count, 1)
        if isinstance(self.probability, bool) or not isinstance(self.probability, (int, float)):
            raise TypeError(f"AdmissionConfig.probability must be a float, got {self.probability!r}")
        if not (0.0 < float(self.probability) <= 1.0):
            raise ValueError(f"AdmissionConfig.probability must be in (0, 1], got {self.probability}")
        self.probability = float(self.probability)
        _check_int("AdmissionConfig", "seed", self.seed, -(1 << 63), (1 << 63) - 1)
        if self.sketch_depth is not None:
            _check_int("AdmissionConfig", "sketch_depth", self.sketch_depth, 0, 16)
        if self.sketch_width is not None:
            _check_int("AdmissionConfig", "sketch_width", self.sketch_width, 1, 1 << 30)
            if self.sketch_width & (self.sketch_width - 1):
                raise ValueError(
                    f"AdmissionConfig.sketch_width must be a power of two, got {self.sketch_width} "
                    f"(nearest: {_next_pow2(self.sketch_width) // 2} or {_next_pow2(self.sketch_width)})"
                )
        if self.sketch_halve_every is not None:
            _check_int("AdmissionConfig", "sketch_halve_every", self.sketch_halve_every, 1, MAX_SKETCH_HALVE_EVERY)

    def resolved_depth(self, eviction: "EvictionPolicy") -> int:
        """Rows of the count-min sketch (0: no sketch) of a table evicting by ``eviction``.

        Without a sketch a newcomer's priority is its batch count. ``lfu`` and ``feature_score`` compare
        it with counts or scores that live ids accumulate over many steps, which a batch count rarely
        beats, so they keep the sketch (measured: ``feature_score`` without it fell from 0.595 to 0.569
        mean prequential AUC on the sliding stream of ``benchmarks/dynamic_drift_quality.py``);
        ``distance_lfu`` divides counts by the steps since last seen, and ``lru`` ignores counts.
        """
        if self.sketch_depth is not None:
            return self.sketch_depth
        if self.min_count > 1 or eviction in (EvictionPolicy.LFU, EvictionPolicy.FEATURE_SCORE):
            return 4
        return 0

    def resolved_width(self, capacity: int) -> int:
        """The sketch width used for a table of ``capacity`` slots."""
        return self.sketch_width if self.sketch_width is not None else max(64, _next_pow2(capacity) // 2)

    def resolved_halve_every(self, capacity: int) -> int:
        """Recorded occurrences between two halvings of the sketch."""
        if self.sketch_halve_every is not None:
            return self.sketch_halve_every
        return min(10 * self.resolved_width(capacity), MAX_SKETCH_HALVE_EVERY)

    def coin_threshold(self) -> int:
        """The admission coin passes when its 53-bit hash is below this integer (2**53 always passes)."""
        return 1 << 53 if self.probability >= 1.0 else int(math.floor(self.probability * float(1 << 53)))


@dataclass
class ExpiryConfig:
    """When a live id that has gone quiet gives its slot back.

    An id expires when more than ``ttl_steps`` steps, or more than ``ttl_seconds`` seconds, have passed
    since it was last seen (either condition suffices; ``None`` disables it). Expiry runs as a sweep over
    the table, at most every ``sweep_every_steps`` steps (see ``DynamicIdRemapper.maybe_expire``).
    """

    ttl_steps: Optional[int] = None
    ttl_seconds: Optional[float] = None
    sweep_every_steps: int = 100

    def __post_init__(self) -> None:
        if self.ttl_steps is not None:
            _check_int("ExpiryConfig", "ttl_steps", self.ttl_steps, 1)
        if self.ttl_seconds is not None:
            if isinstance(self.ttl_seconds, bool) or not isinstance(self.ttl_seconds, (int, float)):
                raise TypeError(f"ExpiryConfig.ttl_seconds must be a float, got {self.ttl_seconds!r}")
            if not (float(self.ttl_seconds) > 0.0 and math.isfinite(self.ttl_seconds)):
                raise ValueError(f"ExpiryConfig.ttl_seconds must be a finite number > 0, got {self.ttl_seconds}")
            self.ttl_seconds = float(self.ttl_seconds)
        _check_int("ExpiryConfig", "sweep_every_steps", self.sweep_every_steps, 1)

    @property
    def enabled(self) -> bool:
        return self.ttl_steps is not None or self.ttl_seconds is not None


@dataclass
class RowInitConfig:
    """Initial value of a (re)assigned slot's embedding row.

    ``scale`` is the half-width of ``uniform`` or the standard deviation of ``normal``; ``None`` uses
    TorchRec's default for embedding tables, ``sqrt(1 / capacity)``.
    """

    kind: RowInit = RowInit.UNIFORM
    scale: Optional[float] = None

    def __post_init__(self) -> None:
        self.kind = RowInit.parse(self.kind, "RowInitConfig.kind")
        if self.scale is not None and not (float(self.scale) >= 0.0 and math.isfinite(self.scale)):
            raise ValueError(f"RowInitConfig.scale must be a finite number >= 0, got {self.scale}")

    def resolved_scale(self, capacity: int) -> float:
        return float(self.scale) if self.scale is not None else math.sqrt(1.0 / capacity)


@dataclass
class DynamicTableConfig:
    """A fixed-capacity embedding table whose rows are lent to raw int64 ids by a hash table.

    Args:
        capacity: number of slots (embedding rows) of the whole table, all shards together; under
            SparseStrategy it is read from the table (``num_embeddings``), and a value given that
            disagrees is an error. A :class:`DynamicIdRemapper` built by hand needs it.
        admission: when an unseen id gets a slot (:class:`AdmissionConfig`).
        expiry: when a quiet id gives its slot back (:class:`ExpiryConfig`).
        eviction: who is evicted when the table is full (:class:`EvictionPolicy`).
        score_decay: per-step decay of the feature score, in (0, 1]; 1 means no decay.
        init: how a reassigned row is re-initialised (:class:`RowInitConfig`).
        placement: where the hash table lives under a multi-rank strategy (:class:`HashPlacement`).
        fallback_rows: rows of the table reserved as shared fallback rows: an id without a slot (not
            admitted yet, rejected when full, evicted, expired, or unknown at evaluation) reads and trains
            the fallback row ``hash(id) % fallback_rows`` instead of being dropped, so it still learns
            something (hashing trick) until it earns a row of its own. The hash table lends only the other
            ``capacity - fallback_rows`` rows. Each row block of a sharded table reserves its share at the
            end of the block (see :meth:`block_fallback_rows`). Default 0: no fallback rows, unslotted
            ids are dropped from the bag (they read zero and train nothing). The default is measured on
            the two drifting streams of ``benchmarks/dynamic_drift_quality.py``: with ``feature_score``
            eviction every size tried (capacity/64 to capacity/2) lowered prequential AUC on both; with
            ``distance_lfu`` one row, capacity/64 and capacity/16 moved it by -0.003 to +0.001, never up
            on both (benchmarks/RESULTS.md, issue 12).
    """

    capacity: Optional[int] = None
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    expiry: ExpiryConfig = field(default_factory=ExpiryConfig)
    eviction: EvictionPolicy = EvictionPolicy.DISTANCE_LFU
    score_decay: float = 0.99
    init: RowInitConfig = field(default_factory=RowInitConfig)
    placement: HashPlacement = HashPlacement.SHARDED
    fallback_rows: int = 0

    def __post_init__(self) -> None:
        if self.capacity is not None:
            _check_int("DynamicTableConfig", "capacity", self.capacity, 1, (1 << 31) - 1)
        _check_int("DynamicTableConfig", "fallback_rows", self.fallback_rows, 0, (1 << 31) - 1)
        if self.capacity is not None and self.fallback_rows and self.fallback_rows >= self.capacity:
            raise ValueError(
                f"DynamicTableConfig.fallback_rows={self.fallback_rows} leaves no row for the hash table of "
                f"capacity {self.capacity}; use fewer fallback rows (0 disables them)"
            )
        for name, cls in (("admission", AdmissionConfig), ("expiry", ExpiryConfig), ("init", RowInitConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, build_dataclass(cls, value, f"DynamicTableConfig.{name}"))
            elif not isinstance(value, cls):
                raise TypeError(f"DynamicTableConfig.{name} must be a {cls.__name__} or a mapping, got {value!r}")
        self.eviction = EvictionPolicy.parse(self.eviction, "DynamicTableConfig.eviction")
        self.placement = HashPlacement.parse(self.placement, "DynamicTableConfig.placement")
        if isinstance(self.score_decay, bool) or not isinstance(self.score_decay, (int, float)):
            raise TypeError(f"DynamicTableConfig.score_decay must be a float, got {self.score_decay!r}")
        if not (0.0 < float(self.score_decay) <= 1.0):
            raise ValueError(f"DynamicTableConfig.score_decay must be in (0, 1], got {self.score_decay}")
        self.score_decay = float(self.score_decay)

    def block_fallback_rows(self, block_rows: int, capacity: int) -> int:
        """Fallback rows reserved at the end of a row block of ``block_rows`` of the table's ``capacity`` rows.

        The block's share of the table's fallback rows, ``fallback * block_rows // capacity``, at least 1
        when the table has any, so every hash partition (one per row block, see ``HashPlacement``) sends
        its own unslotted ids to fallback rows in its own block, on the rank that holds them. A whole
        table is one block and reserves exactly ``fallback_rows``.
        """
        fallback = self.fallback_rows
        if fallback == 0:
            return 0
        rows = max(1, fallback * block_rows // capacity)
        if rows >= block_rows:
            raise ValueError(
                f"DynamicTableConfig.fallback_rows: a row block of {block_rows} rows (of a table of {capacity}) "
                f"would keep {rows} fallback rows and no row for its hash table; use a larger capacity or "
                f"fewer fallback rows (0 disables them)"
            )
        return rows
