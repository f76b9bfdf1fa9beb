"""Typed configuration shared by the Python API, the CLI and YAML files.

One dataclass or enum per concept. The strategy, ``lightning-sparse`` (LightningCLI/jsonargparse) and
YAML configs all read these, so a typo in a YAML key or value is rejected with the allowed names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_sparse.dynamic.config import DynamicTableConfig
from lightning_sparse.typed_config import NamedEnum, build_dataclass


class ShardingType(NamedEnum):
    """How a table is split across ranks (TorchRec sharding types), or ``auto``.

    ``auto``, when fitting on several processes, gives each static pooled table the type among ``table_wise``,
    ``column_wise``, ``row_wise`` and ``data_parallel`` that sends the fewest bytes per step for the first
    training batches and fits in memory (``distributed/auto_sharding.py``); elsewhere TorchRec's planner
    chooses among the fused types (never ``data_parallel``; on CPU never ``row_wise`` / ``table_row_wise``).
    ``row_wise`` and ``table_row_wise`` run on every backend (``distributed/row_wise.py``).
    """

    AUTO = "auto"
    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    ROW_WISE = "row_wise"
    TABLE_ROW_WISE = "table_row_wise"
    TABLE_COLUMN_WISE = "table_column_wise"
    DATA_PARALLEL = "data_parallel"


class SparseOptimizerKind(NamedEnum):
    """The update rule applied to embedding rows, fused into the backward pass.

    Memory per row of dimension ``d`` (fp32 state): ``sgd`` 0, ``adagrad`` d, ``rowwise_adagrad`` 1,
    ``decayed_adagrad`` d, ``rowwise_adam`` 1 (+ d with ``rowwise_adam_first_moment``), ``adam`` 2d.
    """

    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"
    DECAYED_ADAGRAD = "decayed_adagrad"
    ROWWISE_ADAM = "rowwise_adam"
    ADAM = "adam"


@dataclass
class SparseOptimizerConfig:
    """Hyper-parameters of the sparse (embedding) optimizer.

    Args:
        kind: the update rule, see :class:`SparseOptimizerKind`.
        lr: learning rate of the embedding rows (independent of the dense optimizer's).
        eps: term added to the denominator of adaptive rules.
        weight_decay: L2 penalty applied to the rows present in the batch.
        beta1: first-moment decay (``adam``, ``rowwise_adam`` with ``first_moment``).
        beta2: second-moment decay (``adam``, ``rowwise_adam``).
        first_moment: keep a per-element first moment in ``rowwise_adam``.
        decay: accumulator decay of ``decayed_adagrad`` (``acc = acc * decay + g^2``).
    """

    kind: SparseOptimizerKind = SparseOptimizerKind.ROWWISE_ADAGRAD
    lr: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    first_moment: bool = False
    decay: float = 0.95

    def __post_init__(self) -> None:
        self.kind = SparseOptimizerKind.parse(self.kind, "SparseOptimizerConfig.kind")
        for name in ("lr", "eps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"SparseOptimizerConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0 + 1e-12:
                raise ValueError(f"SparseOptimizerConfig.{name} must be in [0, 1], got {value}")


class CacheBacking(NamedEnum):
    """Where a cached table's full rows and optimizer state live (see :class:`CacheConfig`).

    ``auto``: host memory when training on a GPU, a memory-mapped file on local disk on a CPU.
    ``host``: tensors in host memory. ``mmap``: a file under ``CacheConfig.path`` (tables larger than RAM).
    """

    AUTO = "auto"
    HOST = "host"
    MMAP = "mmap"


DEFAULT_HORIZON = 16  # batches of ids read ahead to choose victims (benchmarks/lookahead_cache.py measures 2-64)


@dataclass
class CacheConfig:
    """A look-forward (ScratchPipe) cache: the table's rows live in a backing store, the kernels train a
    scratchpad of ``rows`` slots, filled ahead of time from the ids of the next ``lookahead`` batches.

    Args:
        rows: scratchpad slots C; the ids of any ``lookahead + 1`` consecutive batches must fit.
        lookahead: k, how many batches ahead the planner copies rows in (0: copies wait for the lookup).
        horizon: K >= k, how many batches ahead the loader reads ids to choose victims: a slot whose row a
            batch within K is next to need is kept over one no batch within K needs, and among those the
            furthest next use goes first (Belady's rule over K batches). ``None``: ``max(lookahead, 16)``.
            The loader holds K batches read ahead; it changes which rows are copied, never the results.
        backing: :class:`CacheBacking`.
        path: folder of the memory-mapped backing files (default: the system's temporary folder).
        score_decay: per-batch decay of the use counts that order the eviction of rows no batch of the
            window needs, in (0, 1] (1: plain counts).
    """

    rows: int
    lookahead: int = 2
    horizon: Optional[int] = None
    backing: CacheBacking = CacheBacking.AUTO
    path: Optional[str] = None
    score_decay: float = 0.997

    def __post_init__(self) -> None:
        for name, low in (("rows", 1), ("lookahead", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CacheConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.horizon is not None and (
            isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < self.lookahead
        ):
            raise ValueError(
                f"CacheConfig.horizon must be an integer >= lookahead ({self.lookahead}) or None "
                f"(max(lookahead, {DEFAULT_HORIZON})), got {self.horizon!r}"
            )
        self.backing = CacheBacking.parse(self.backing, "CacheConfig.backing")
        if (
            isinstance(self.score_decay, bool)
            or not isinstance(self.score_decay, (int, float))
            or not 0 < self.score_decay <= 1
        ):
            raise ValueError(f"CacheConfig.score_decay must be a number in (0, 1], got {self.score_decay!r}")
        self.score_decay = float(self.score_decay)

    @property
    def batches_ahead(self) -> int:
        """K: the horizon, resolved (see ``horizon``)."""
        return self.horizon if self.horizon is not None else max(self.lookahead, DEFAULT_HORIZON)


@dataclass
class TableConfig:
    """Per-table overrides; unset fields take the strategy-wide defaults.

    Args:
        sharding: how this table is sharded (see :class:`ShardingType`).
        optimizer: this table's sparse optimizer (default: the strategy's ``optimizer``).
        dynamic: make this a dynamic table: raw int64 ids of any value are mapped to its rows by a hash
            table with admission, expiry and eviction (its ``capacity`` must equal the table's rows).
        pretrained: path to a ``.npy`` file of the table's initial rows (float32, ``rows x dim``); each
            rank reads only its shard's rows and columns (memory-mapped).
        cache: keep the table's rows in a backing store and train them in a scratchpad filled ahead of
            time (:class:`CacheConfig`); the table then runs on the ``native`` route.
    """

    sharding: Optional[ShardingType] = None
    optimizer: Optional[SparseOptimizerConfig] = None
    dynamic: Optional[DynamicTableConfig] = None
    pretrained: Optional[str] = None
    cache: Optional[CacheConfig] = None

    def __post_init__(self) -> None:
        if self.sharding is not None:
            self.sharding = ShardingType.parse(self.sharding, "TableConfig.sharding")
        if isinstance(self.optimizer, dict):
            self.optimizer = build_dataclass(SparseOptimizerConfig, self.optimizer, "TableConfig.optimizer")
        if isinstance(self.dynamic, dict):
            self.dynamic = build_dataclass(DynamicTableConfig, self.dynamic, "TableConfig.dynamic")
        if isinstance(self.cache, dict):
            self.cache = build_dataclass(CacheConfig, self.cache, "TableConfig.cache")


class TableInitKind(NamedEnum):
    """Where a table's initial values come from; decided once per table when the tables are resolved.

    ``copy``: the module holds the full table on the host, each local shard is copied from it.
    ``replay``: built on ``meta`` by lightning_sparse (``table_init.meta_embedding_bag_collection``): each
    shard replays its part of the recorded draw, identical to a CPU build. ``init_fn``: on ``meta`` without
    a recorded draw: the table config's ``init_fn`` is applied to each shard, so the values depend on the
    placement. ``pretrained``: rows read from the ``.npy`` file of ``TableConfig.pretrained``.
    """

    COPY = "copy"
    REPLAY = "replay"
    INIT_FN = "init_fn"
    PRETRAINED = "pretrained"


class TableRoute(NamedEnum):
    """Which engine trains a table's rows; decided once per table when the tables are resolved.

    ``fused``: fbgemm's TBE applies the rule inside its backward pass (only where fbgemm implements the
    kind *and* every hyper-parameter exactly on the device). ``native``: the TBE only looks rows up; the
    exact row gradients are assembled from its output gradient and lightning_sparse's kernels apply the
    rule. ``data_parallel``: a replicated table with dense, all-reduced gradients, updated by the same
    kernels on the rows the global batch touched.
    """

    FUSED = "fused"
    NATIVE = "native"
    DATA_PARALLEL = "data_parallel"


@dataclass
class ResolvedTable:
    """The effective settings of one table after defaults and overrides are merged.

    ``route`` and ``route_reason`` (why it is not fused, empty when it is) are decided once, in
    ``resolve_tables``; ``param_path`` is the table weight's key in the model's state dict. ``init`` says
    where the initial values come from and ``initialiser`` carries it: the host weight (``copy``), the
    ``TableInit`` or ``init_fn`` (``replay``, ``init_fn``) or the file path (``pretrained``). ``rows`` are the
    rows of the sharded table: a cached table's scratchpad slots (its ids range over ``cache_rows``).
    """

    name: str
    sharding: ShardingType
    optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    dynamic: Optional[DynamicTableConfig] = None
    route: TableRoute = TableRoute.FUSED
    route_reason: str = ""
    param_path: str = ""
    rows: int = 0
    dim: int = 0
    init: TableInitKind = TableInitKind.COPY
    initialiser: Any = None
    cache: Optional[CacheConfig] = None
    cache_rows: int = 0


class PipelineKind(NamedEnum):
    """How a training step's stages overlap (``lightning_sparse/strategies/pipelines.py``).

    ``none``: input distribution, lookup, dense forward/backward and row update one after another.
    ``sparse_dist``: TorchRec's ``TrainPipelineSparseDist``: the next batch's input distribution starts
    before this batch's forward; results are bit-identical to ``none``.
    ``hybrid``: PERSIA's hybrid synchronisation: embedding lookups run up to ``staleness`` batches ahead on
    a worker thread, so a lookup may miss the row updates of at most ``staleness`` earlier batches; the
    dense layers stay synchronous. ``staleness: 0`` is bit-identical to ``none``.
    ``semi_sync``: TorchRec's ``TrainPipelineSemiSync`` semantics (the next batch's lookup before this
    batch's row update): ``hybrid`` with ``staleness: 1``.
    """

    NONE = "none"
    SPARSE_DIST = "sparse_dist"
    HYBRID = "hybrid"
    SEMI_SYNC = "semi_sync"


@dataclass
class PipelineConfig:
    """The strategy's training pipeline.

    Args:
        kind: see :class:`PipelineKind`.
        staleness: ``hybrid`` only: how many earlier batches' row updates a lookup may miss (``S`` >= 0).
            ``semi_sync`` is 1, ``none`` and ``sparse_dist`` 0; another value for them is an error.
    """

    kind: PipelineKind = PipelineKind.NONE
    staleness: Optional[int] = None

    def __post_init__(self) -> None:
        self.kind = PipelineKind.parse(self.kind, "PipelineConfig.kind")
        fixed = {PipelineKind.NONE: 0, PipelineKind.SPARSE_DIST: 0, PipelineKind.SEMI_SYNC: 1}
        if self.kind is PipelineKind.HYBRID:
            if self.staleness is None or int(self.staleness) != self.staleness or self.staleness < 0:
                raise ValueError(
                    f"PipelineConfig.staleness={self.staleness!r}: pipeline 'hybrid' needs an integer staleness >= 0 "
                    "(e.g. {kind: hybrid, staleness: 4})"
                )
            self.staleness = int(self.staleness)
        elif self.staleness is not None and self.staleness != fixed[self.kind]:
            raise ValueError(
                f"PipelineConfig.staleness={self.staleness!r} does not apply to pipeline {self.kind.value!r} "
                f"(its staleness is {fixed[self.kind]}); choose kind 'hybrid' to set it"
            )
        else:
            self.staleness = fixed[self.kind]

    @classmethod
    def parse(cls, value: "PipelineConfig | PipelineKind | str | dict | None", what: str) -> "PipelineConfig":
        """A config from itself, a kind's name (``"sparse_dist"``) or a mapping (``{kind: hybrid, staleness: 2}``)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return build_dataclass(cls, value, what)
        return cls(kind=PipelineKind.parse(value, what))
