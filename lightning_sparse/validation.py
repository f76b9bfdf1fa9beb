"""Checks of every training/evaluation batch, so that bad input is an error (or, opted in, dropped and counted)
instead of being trained on silently.

Without them an id past the end of a static table reaches fbgemm, whose bounds check only warns, sets the
id to row 0 and edits the caller's tensor in place; a NaN dense feature spreads to every weight within a
step; a KeyedJaggedTensor whose lengths do not add up to its values is read out of bounds. Two users:

- :class:`InputChecks` (called once per step by ``SparseStrategy``, which knows the tables): the structure of
  every ``KeyedJaggedTensor``, the ids of static tables (``bad_ids: error | drop``; dynamic tables take any
  raw id), and non-finite dense features or labels of a torchrec ``Batch`` (``non_finite: error | skip``).
  Nothing is edited in place: dropping builds new tensors.
- :func:`check_click_batch` / :func:`check_loss` (called by ``ClickModule``, under any strategy): a
  non-empty batch whose sizes agree, labels in [0, 1], finite dense features, a finite loss.

A valid batch costs one pass over its ids (each key's smallest and largest id against its table's rows) and
one sum over its dense features and labels; the per-value masks that name a bad id or sample are built only
when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.sparse.jagged_tensor_validator import validate_keyed_jagged_tensor

from lightning_sparse.dynamic.kjt import with_slots
from lightning_sparse.typed_config import NamedEnum

_INT64 = torch.iinfo(torch.int64)


class BadIdPolicy(NamedEnum):
    """What happens to an id outside ``[0, num_embeddings)`` of a static table: ``error`` (default) stops
    with the table, feature and value; ``drop`` removes it from its bag and counts it (``input/dropped_ids``)."""

    ERROR = "error"
    DROP = "drop"


class NonFinitePolicy(NamedEnum):
    """What happens to a sample whose dense features or label are NaN or infinite: ``error`` (default)
    stops naming the sample and feature; ``skip`` removes the sample from the batch and counts it
    (``input/skipped_samples``)."""

    ERROR = "error"
    SKIP = "skip"


@dataclass(frozen=True)
class StaticTable:
    """A table whose ids are rows: valid ids are ``0 <= id < rows``."""

    name: str
    rows: int


def static_tables_by_feature(modules: Iterable[nn.Module], dynamic_tables: Iterable[str]) -> dict[str, StaticTable]:
    """Feature key -> its table, for every table of the TorchRec ``modules`` that is not dynamic."""
    dynamic = set(dynamic_tables)
    found: dict[str, StaticTable] = {}
    for module in modules:
        if isinstance(module, EmbeddingBagCollection):
            configs = module.embedding_bag_configs()
        elif isinstance(module, EmbeddingCollection):
            configs = module.embedding_configs()
        else:
            raise TypeError(
                f"expected a TorchRec EmbeddingBagCollection or EmbeddingCollection, got {type(module).__name__}"
            )
        for config in configs:
            if config.name not in dynamic:
                found.update(
                    {feature: StaticTable(config.name, config.num_embeddings) for feature in config.feature_names}
                )
    return found


def check_kjt_structure(kjt: KeyedJaggedTensor, where: str = "batch") -> None:
    """Raises ValueError unless ``kjt``'s lengths (or offsets), keys and weights agree with its values.

    TorchRec's own validator does the work; it is otherwise only run on the first batch a sharded module sees.
    """
    lengths = kjt.lengths_or_none()
    if lengths is not None and lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(
            f"{where}: KeyedJaggedTensor (keys {kjt.keys()}) has negative lengths; every bag length must be >= 0"
        )
    try:
        validate_keyed_jagged_tensor(kjt)
    except ValueError as error:
        raise ValueError(
            f"{where}: malformed KeyedJaggedTensor (keys {kjt.keys()}, {kjt.values().numel()} values): {error}. "
            "Build it with one length per (key, sample) whose sum is the number of values."
        ) from None


class InputChecks:
    """Per-batch checks of the strategy: KJT structure, static-table ids, non-finite dense features and labels.

    Args:
        static_tables: feature key -> static table (:func:`static_tables_by_feature`); other keys are not
            bounds-checked (dynamic tables map any raw id, unknown keys are not looked up).
        bad_ids: see :class:`BadIdPolicy`.
        non_finite: see :class:`NonFinitePolicy`.
    """

    def __init__(
        self,
        static_tables: Mapping[str, StaticTable],
        bad_ids: BadIdPolicy = BadIdPolicy.ERROR,
        non_finite: NonFinitePolicy = NonFinitePolicy.ERROR,
    ) -> None:
        self.static_tables = dict(static_tables)
        self.bad_ids = BadIdPolicy.parse(bad_ids, "bad_ids")
        self.non_finite = NonFinitePolicy.parse(non_finite, "non_finite")
        # Counted on this rank since construction (training and evaluation batches alike).
        self.dropped_ids: dict[str, int] = {table.name: 0 for table in self.static_tables.values()}
        self.skipped_samples = 0
        self._bounds: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.tables: Any = None  # what for_tables built these checks from

    @classmethod
    def for_tables(cls, tables: Any, bad_ids: BadIdPolicy, non_finite: NonFinitePolicy) -> "InputChecks":
        """Checks for a strategy's ``EmbeddingTables`` (its ``modules`` and resolved ``tables``)."""
        dynamic = [name for name, table in tables.tables.items() if table.dynamic is not None]
        static = static_tables_by_feature(tables.modules.values(), dynamic)
        cached = {name: table.cache_rows for name, table in tables.tables.items() if table.cache is not None}
        static = {key: StaticTable(t.name, cached.get(t.name, t.rows)) for key, t in static.items()}  # ids range over N
        checks = cls(static, bad_ids, non_finite)
        checks.tables = tables
        return checks

    def check_step(
        self, args: tuple, log_to: Optional[LightningModule] = None, device: Optional[torch.device] = None
    ) -> tuple:
        """A step's arguments with the batch (the first) checked; with ``log_to`` (training), the drop
        counts are logged summed over ranks (one small all-reduce, only when a drop policy is chosen)."""
        if not args:
            return args
        batch = self(args[0])
        metrics = self.metrics()
        if log_to is not None and metrics:
            names = sorted(metrics)
            totals = torch.tensor([metrics[name] for name in names], dtype=torch.float64, device=device)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(totals)
            for name, total in zip(names, totals.tolist()):
                log_to.log(name, total, on_step=True, on_epoch=False)
        return (batch,) + args[1:]

    def __call__(self, batch: Any) -> Any:
        """The batch checked: every KJT in it (ids of static tables), then, for a torchrec ``Batch``, its
        dense features and labels. Returns the same object when nothing is dropped."""
        if isinstance(batch, Batch):  # the common case, without apply_to_collection's walk and copy
            sparse = self.check_kjt(batch.sparse_features)
            if sparse is not batch.sparse_features:
                batch = Batch(dense_features=batch.dense_features, sparse_features=sparse, labels=batch.labels)
        else:
            batch = apply_to_collection(batch, KeyedJaggedTensor, self.check_kjt)
        if isinstance(batch, Batch):
            check_batch_sizes(batch)
            batch = self._check_finite(batch)
        return batch

    # ------------------------------------------------------------------ ids
    def check_kjt(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        check_kjt_structure(kjt)
        values = kjt.values()
        if values.numel() == 0 or not any(key in self.static_tables for key in kjt.keys()):
            return kjt
        lower, upper = self._per_key_bounds(kjt.keys(), values.device)
        ids = values.long()
        lowest, highest = _per_key_min_max(ids, kjt.length_per_key())
        if not bool(((lowest < lower) | (highest > upper)).any()):  # the common case: one pass, one host sync
            return kjt
        per_key = torch.tensor(kjt.length_per_key(), device=values.device)
        bad = (ids < lower.repeat_interleave(per_key, output_size=ids.numel())) | (
            ids > upper.repeat_interleave(per_key, output_size=ids.numel())
        )
        key_of_value = torch.arange(len(kjt.keys()), device=values.device).repeat_interleave(
            per_key, output_size=ids.numel()
        )
        bad_per_key = torch.bincount(key_of_value[bad], minlength=len(kjt.keys())).tolist()
        if self.bad_ids is BadIdPolicy.ERROR:
            raise ValueError(self._bad_id_message(kjt, ids, bad, key_of_value, bad_per_key))
        slots = {}
        for k, key in enumerate(kjt.keys()):
            if bad_per_key[k]:
                self.dropped_ids[self.static_tables[key].name] += bad_per_key[k]
                in_key = key_of_value == k
                slots[key] = torch.where(bad[in_key], -1, ids[in_key])
        return with_slots(kjt, slots)

    def _per_key_bounds(self, keys: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest valid id of each key (the whole int64 range for keys of no static table)."""
        cached = self._bounds.get(tuple(keys))
        if cached is None or cached[0].device != device:
            tables = [self.static_tables.get(key) for key in keys]
            lower = torch.tensor([_INT64.min if t is None else 0 for t in tables], dtype=torch.int64, device=device)
            upper = torch.tensor(
                [_INT64.max if t is None else t.rows - 1 for t in tables], dtype=torch.int64, device=device
            )
            cached = self._bounds[tuple(keys)] = (lower, upper)
        return cached

    def _bad_id_message(
        self,
        kjt: KeyedJaggedTensor,
        ids: torch.Tensor,
        bad: torch.Tensor,
        key_of_value: torch.Tensor,
        bad_per_key: list[int],
    ) -> str:
        lines = []
        for k, key in enumerate(kjt.keys()):
            if bad_per_key[k]:
                table = self.static_tables[key]
                examples = ids[bad & (key_of_value == k)][:3].tolist()
                lines.append(
                    f"feature {key!r} of table {table.name!r} ({table.rows} rows): {bad_per_key[k]} id(s) outside "
                    f"[0, {table.rows}), e.g. {', '.join(map(str, examples))}"
                )
        return (
            "ids out of range for static embedding tables:\n  " + "\n  ".join(lines) + "\n"
            "Map ids into the table (hash or modulo them to num_embeddings), make the table dynamic "
            "(TableConfig.dynamic), or set SparseStrategy(bad_ids='drop') to drop and count them."
        )

    # ------------------------------------------------------- dense / labels
    def _check_finite(self, batch: Batch) -> Batch:
        finite = finite_samples(batch)
        if finite is None:
            return batch
        if self.non_finite is NonFinitePolicy.ERROR:
            raise ValueError(
                non_finite_message(batch, finite)
                + " Clean the data, or set SparseStrategy(non_finite='skip') to skip and count such samples."
            )
        kept = int(finite.sum())
        if kept == 0:
            raise ValueError(
                f"every one of the {finite.numel()} samples of the batch has a non-finite dense feature or label; "
                "non_finite='skip' leaves nothing to train on. Check the data source."
            )
        self.skipped_samples += finite.numel() - kept
        return select_samples(batch, finite)

    # ------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """Counts on this rank: ``input/dropped_ids`` and ``input/dropped_ids/<table>`` (every static table,
        so that every rank reduces the same list) under ``bad_ids='drop'``, ``input/skipped_samples`` under
        ``non_finite='skip'``."""
        metrics: dict[str, float] = {}
        if self.bad_ids is BadIdPolicy.DROP:
            metrics["input/dropped_ids"] = float(sum(self.dropped_ids.values()))
            metrics.update({f"input/dropped_ids/{t}": float(n) for t, n in sorted(self.dropped_ids.items())})
        if self.non_finite is NonFinitePolicy.SKIP:
            metrics["input/skipped_samples"] = float(self.skipped_samples)
        return metrics


def _per_key_min_max(ids: torch.Tensor, length_per_key: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest id of each key's values (0 for a key without values), in one pass over ``ids``:
    a ``[keys, length]`` view when every key has as many values (fixed pooling), else one reduction per key.
    Comparing these with the tables' bounds is what a batch of valid ids costs; the per-value mask that names
    the bad ids is built only when some key is out of range."""
    if len(set(length_per_key)) == 1:
        return torch.aminmax(ids.view(len(length_per_key), -1), dim=1)
    lowest = torch.zeros(len(length_per_key), dtype=ids.dtype, device=ids.device)
    highest = torch.zeros_like(lowest)
    for k, part in enumerate(torch.split(ids, length_per_key)):
        if part.numel():
            lowest[k], highest[k] = torch.aminmax(part)
    return lowest, highest


def finite_samples(batch: Batch) -> Optional[torch.Tensor]:
    """A mask of the samples whose dense features and label are finite, or None when all are."""
    dense, labels = batch.dense_features, batch.labels
    # One reduction first: a sum is finite only if every term is (a finite sum that overflows falls through
    # to the exact per-sample check below, which then finds every sample finite).
    total = labels.sum(dtype=torch.float64) + (dense.sum(dtype=torch.float64) if dense.is_floating_point() else 0)
    if bool(torch.isfinite(total)):
        return None
    finite = torch.isfinite(labels.reshape(labels.shape[0], -1)).all(dim=1) if labels.numel() else None
    if dense.is_floating_point() and dense.numel():
        dense_ok = torch.isfinite(dense.reshape(dense.shape[0], -1)).all(dim=1)
        finite = dense_ok if finite is None else finite & dense_ok
    if finite is None or bool(finite.all()):
        return None
    return finite


def non_finite_message(batch: Batch, finite: torch.Tensor) -> str:
    sample = int((~finite).nonzero()[0])
    dense = batch.dense_features.reshape(batch.dense_features.shape[0], -1)
    bad_columns = (~torch.isfinite(dense[sample])).nonzero().flatten().tolist()
    where = (
        f"dense feature {bad_columns[0]} is {dense[sample, bad_columns[0]].item()}"
        if bad_columns
        else f"label is {batch.labels.reshape(-1)[sample].item()}"
    )
    return f"{int((~finite).sum())} sample(s) of the batch are not finite; the first, sample {sample}: {where}."


def select_samples(batch: Batch, keep: torch.Tensor) -> Batch:
    """A new Batch of the samples where ``keep`` is true (dense rows, labels and every feature's bags)."""
    return Batch(
        dense_features=batch.dense_features[keep],
        sparse_features=select_kjt_samples(batch.sparse_features, keep),
        labels=batch.labels[keep],
    )


def select_kjt_samples(kjt: KeyedJaggedTensor, keep: torch.Tensor) -> KeyedJaggedTensor:
    """``kjt`` restricted to the samples where ``keep`` (one entry per sample) is true."""
    if kjt.variable_stride_per_key():
        raise ValueError("selecting samples of a KeyedJaggedTensor with a variable stride per key is not supported")
    keys, lengths = kjt.keys(), kjt.lengths()
    keep_bags = keep.to(lengths.device).repeat(len(keys))
    keep_values = keep_bags.repeat_interleave(lengths, output_size=kjt.values().numel())
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=keys,
        values=kjt.values()[keep_values],
        weights=None if weights is None else weights[keep_values],
        lengths=lengths[keep_bags],
        stride=int(keep.sum()),
    )


# ------------------------------------------------------------------------ model-side checks (ClickModule)
def check_batch_sizes(batch: Batch) -> None:
    """Raises ValueError unless labels, dense rows and the sparse features' samples are equally many."""
    samples = batch.labels.shape[0] if batch.labels.dim() else 1
    rows = batch.dense_features.shape[0]
    stride = batch.sparse_features.stride()
    if not rows == stride == samples:
        raise ValueError(
            f"batch sizes disagree: {samples} labels, {rows} rows of dense_features, {stride} samples in sparse_features"
        )


def check_click_batch(batch: Batch) -> None:
    """Raises ValueError for a batch a binary click model cannot train on: no samples, sizes that disagree,
    labels outside [0, 1] or non-finite, non-finite dense features."""
    labels = batch.labels
    if labels.numel() == 0:
        raise ValueError(
            "empty batch (0 samples): the data module yielded a batch without samples; skip empty batches at the source"
        )
    check_batch_sizes(batch)
    finite = finite_samples(batch)
    if finite is not None:
        raise ValueError(
            non_finite_message(batch, finite)
            + " Clean the data (or skip such samples with SparseStrategy(non_finite='skip'))."
        )
    outside = (labels < 0) | (labels > 1)
    if bool(outside.any()):
        first = labels.reshape(-1)[outside.reshape(-1)][:3].tolist()
        raise ValueError(
            f"{int(outside.sum())} label(s) outside [0, 1], e.g. {first}: click models are trained with binary "
            "cross-entropy on labels 0/1 (or probabilities). Fix the labels at the source."
        )


def check_loss(loss: torch.Tensor, step: int) -> None:
    """Raises ValueError when the training loss is NaN or infinite (inputs were checked: the model diverged)."""
    if not bool(torch.isfinite(loss).all()):
        raise ValueError(
            f"the training loss is {loss.item()} at step {step}, from finite inputs: training diverged. "
            "Lower the learning rates (the model's learning_rate, the sparse optimizer's lr)."
        )
