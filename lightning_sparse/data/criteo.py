"""Streams Criteo display-ads files (Kaggle / Terabyte click logs) as torchrec batches, on any number of ranks.

The format, what a line becomes and what counts as malformed are in :mod:`lightning_sparse.data.criteo_format`
(re-exported here). :class:`CriteoIterableDataset` splits the lines between ranks and DataLoader workers
and remembers where it stands (its position is part of a checkpoint); :class:`CriteoDataModule` serves it
through a :class:`~lightning_sparse.data.loading.ResumableLoader`, so ranks stop an epoch together and a
run resumed at any step reads exactly the lines the straight run reads; :class:`SkippedLinesMonitor`
reports the lines skipped as malformed.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch

from lightning_sparse.data.criteo_format import (  # noqa: F401 - re-exported: the format's public names live here too
    FEATURE_NAMES,
    NUM_DENSE_FEATURES,
    NUM_FIELDS,
    NUM_SPARSE_FEATURES,
    BatchBuilder,
    CriteoFormatError,
    CriteoStats,
    DenseTransform,
    MalformedReason,
    OnError,
    PathsLike,
    _splitmix64_int,
    _splitmix64_np,
    hash_categorical,
    normalize_num_embeddings,
    normalize_paths,
    open_criteo_file,
    parse_line,
)
from lightning_sparse.data.loading import ResumableLoader, fit_progress, process_rank_world, reader_of
from lightning_sparse.trainer_attrs import add_callback_once, trainer_datamodule

_REASONS = list(MalformedReason)
_COL_LINES, _COL_SAMPLES, _COL_REASON0 = 0, 1, 2


class CriteoIterableDataset(IterableDataset):
    """Streams Criteo-format files as whole ``Batch`` objects (use ``DataLoader(ds, batch_size=None)``).

    Line ``g`` (counted across all files in order, malformed lines included) belongs to shard
    ``g % (world_size * num_workers)``; this process reads shard ``rank * num_workers + worker_id``. So every
    line is seen by exactly one (rank, worker) and the split does not depend on timing. Rank and world size
    come from ``torch.distributed`` when it is initialised (else 0/1) unless given explicitly.

    Ranks may end up with different numbers of batches (line counts that do not divide evenly, malformed
    lines). Under collectives in every step (DDP/DMP) a rank with one batch more would wait for the others
    forever: :class:`CriteoDataModule` serves this dataset through a
    :class:`~lightning_sparse.data.loading.ResumableLoader`, which ends the pass on every rank as soon as
    one rank is out of batches. Use one yourself (or cap the epoch) when you build the loader.

    The dataset implements torchdata's ``Stateful`` protocol: :meth:`state_dict` is the position after the
    last batch it yielded (file, byte offset, line number, counters) and :meth:`load_state_dict` makes the
    next pass continue from there, seeking to the offset instead of re-parsing the lines before it.

    Args:
        paths: one file or a list of files (plain or gzip).
        batch_size: rows per yielded batch (the last one of a worker may be smaller unless ``drop_last``).
        num_embeddings_per_feature: table size per categorical feature (26 ints) or one size for all.
        hash_seed: seed of :func:`hash_categorical`; ``None`` for plain modulo.
        on_error: :class:`OnError` (or its name): skip and count malformed lines, or raise.
        dense_transform: :class:`DenseTransform` applied to the 13 integer features.
        drop_last: drop each worker's last incomplete batch.
        rank, world_size: override the distributed rank/world size (e.g. to read one rank's share offline).
        max_workers: number of DataLoader worker slots in the shared counters of :attr:`stats`.
    """

    def __init__(
        self,
        paths: PathsLike,
        batch_size: int,
        num_embeddings_per_feature: Union[int, Sequence[int]] = 100_000,
        hash_seed: Optional[int] = 0,
        on_error: Union[OnError, str] = OnError.SKIP,
        dense_transform: Union[DenseTransform, str] = DenseTransform.LOG1P,
        drop_last: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        max_workers: int = 64,
    ) -> None:
        super().__init__()
        self.paths = normalize_paths(paths, "CriteoIterableDataset.paths")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.num_embeddings_per_feature = normalize_num_embeddings(num_embeddings_per_feature)
        if hash_seed is not None and (isinstance(hash_seed, bool) or not isinstance(hash_seed, int)):
            raise ValueError(f"hash_seed must be an int or None, got {hash_seed!r}")
        self.hash_seed = hash_seed
        self.on_error = OnError.parse(on_error, "on_error")
        self.dense_transform = DenseTransform.parse(dense_transform, "dense_transform")
        self.drop_last = bool(drop_last)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if rank is not None and world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size
        # Workers run in other processes: counters live in shared memory, one row per worker so no races.
        self._counters = torch.zeros(max_workers, _COL_REASON0 + len(_REASONS), dtype=torch.int64).share_memory_()
        self._state: Optional[dict[str, Any]] = None  # position after the last batch yielded
        self._resume: Optional[dict[str, Any]] = None  # position the next pass starts from

    def __getstate__(self) -> dict:
        # Pickled for spawned DataLoader workers, where torch.distributed is not initialised: pin rank now.
        state = dict(self.__dict__)
        if state["rank"] is None and process_rank_world()[1] > 1:
            state["rank"], state["world_size"] = process_rank_world()
        return state

    @property
    def stats(self) -> CriteoStats:
        """Counters of the latest pass of each worker of this process, summed (see :class:`CriteoStats`)."""
        total = self._counters.sum(dim=0).tolist()
        return CriteoStats(
            lines_read=total[_COL_LINES],
            samples=total[_COL_SAMPLES],
            malformed={r.value: total[_COL_REASON0 + k] for k, r in enumerate(_REASONS)},
        )

    def _shard(self) -> tuple:
        return reader_of(self.rank, self.world_size, self._counters.shape[0])

    def state_dict(self) -> dict[str, Any]:
        """Where the current pass stands: after the last batch yielded (``{}`` before the first pass)."""
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Makes the next pass continue from ``state`` (as :meth:`state_dict` returned it)."""
        self._resume = dict(state) if state else None

    def _check_resume(self, state: dict[str, Any], shard: int, num_shards: int) -> None:
        if state["paths"] != self.paths:
            raise ValueError(
                f"The saved Criteo reader position is in the files {state['paths']}; this reader reads {self.paths}. "
                "Resume with the same files in the same order, or from a checkpoint saved at the end of an epoch."
            )
        if (state["shard"], state["num_shards"]) != (shard, num_shards):
            raise ValueError(
                f"The saved Criteo reader position is of line shard {state['shard']} of {state['num_shards']} "
                f"(ranks x DataLoader workers); this reader is shard {shard} of {num_shards}. Resume with the same "
                "number of processes and workers, or from a checkpoint saved at the end of an epoch."
            )

    def __iter__(self) -> Iterator[Batch]:
        shard, num_shards, slot = self._shard()
        resume, self._resume = self._resume, None
        if resume is None:
            resume = {"path_index": 0, "offset": 0, "line_number": 0, "lines_seen": 0, "counts": None}
        else:
            self._check_resume(resume, shard, num_shards)
        # Counted in Python ints and published to the shared tensor at each batch (a tensor op per line
        # would cost more than the parsing).
        counts = list(resume["counts"] or [0] * self._counters.shape[1])
        position = (resume["path_index"], resume["offset"], resume["line_number"], resume["lines_seen"])
        # Set now, not when the generator first runs: a state asked for before the first batch is this one.
        self._state = self._snapshot(shard, num_shards, position, counts)
        return self._read(shard, num_shards, slot, position, counts)

    def _snapshot(self, shard: int, num_shards: int, position: tuple, counts: list) -> dict[str, Any]:
        path_index, offset, line_number, lines_seen = position
        return {
            "paths": list(self.paths), "shard": shard, "num_shards": num_shards, "path_index": path_index,
            "offset": offset, "line_number": line_number, "lines_seen": lines_seen, "counts": list(counts),
        }  # fmt: skip

    def _read(self, shard: int, num_shards: int, slot: int, position: tuple, counts: list) -> Iterator[Batch]:
        counters = self._counters[slot]

        def publish() -> None:
            counters.copy_(torch.tensor(counts, dtype=torch.int64))

        def batch_done(path_index: int, offset: int, line_number: int) -> Batch:
            publish()
            self._state = self._snapshot(shard, num_shards, (path_index, offset, line_number, g), counts)
            return builder.build()

        builder = BatchBuilder(
            self.batch_size,
            np.asarray(self.num_embeddings_per_feature, dtype=np.uint64),
            self.hash_seed,
            self.dense_transform,
        )
        skip = self.on_error is OnError.SKIP
        start_index, start_offset, start_line, g = position
        publish()
        try:
            for path_index in range(start_index, len(self.paths)):
                path = self.paths[path_index]
                offset, line_number = (start_offset, start_line) if path_index == start_index else (0, 0)
                with open_criteo_file(path) as f:
                    if offset:
                        f.seek(offset)  # gzip: decompresses up to there, but parses nothing
                    for raw in f:
                        offset += len(raw)
                        line_number += 1
                        g += 1
                        if (g - 1) % num_shards != shard:
                            continue
                        counts[_COL_LINES] += 1
                        parsed = parse_line(raw)
                        if isinstance(parsed[0], MalformedReason):
                            reason, detail = parsed
                            if not skip:
                                raise CriteoFormatError(path, line_number, reason, detail)
                            counts[_COL_REASON0 + _REASONS.index(reason)] += 1
                            continue
                        builder.add(*parsed)
                        counts[_COL_SAMPLES] += 1
                        if builder.full():
                            yield batch_done(path_index, offset, line_number)
            if builder.n and not self.drop_last:
                yield batch_done(len(self.paths), 0, 0)
        finally:
            publish()


class CriteoDataModule(LightningDataModule):
    """Criteo-format files as train/val/test/predict loaders; models read the table layout from it.

    Every stage's loader is a :class:`~lightning_sparse.data.loading.ResumableLoader`:

    * **Ranks stop together.** Lines are dealt to the ranks one by one, so ranks can hold different numbers
      of batches (401 valid lines in batches of 100 on 2 ranks: 3 batches, the last of 1 line, and 2). Each
      pass ends on every rank as soon as one rank is out of batches; the surplus (here the 1-line batch) is
      not read. With well-formed lines that is at most the last, incomplete batch of each rank's DataLoader
      workers; skipped lines can make it more.
    * **Resuming is exact.** The train loader's position (each rank's file, byte offset and line, and its
      skip counters) is part of the checkpoint; a run resumed at any step, mid-epoch included, reads the
      same batches as the straight run (on the same number of processes and ``num_workers``).
    * **Skipped lines are reported.** ``setup`` adds a :class:`SkippedLinesMonitor` to the trainer (unless
      it has one), which logs ``data/<stage>/skipped_lines`` and ``.../<reason>`` per epoch, summed over
      ranks; ``FitSummary`` prints them.

    Args:
        train_paths: training file(s), plain or gzip.
        val_paths, test_paths, predict_paths: optional file(s) for the other stages.
        batch_size: rows per batch (per rank).
        num_embeddings_per_feature: table size per categorical feature (26 ints) or one size for all.
        hash_seed: seed of the categorical hash; ``null``/None for plain ``int(hex) % size``.
        on_error: ``skip`` (count and drop malformed lines) or ``raise``.
        dense_transform: ``log1p`` (``log(1 + max(x, 0))``, missing -> 0) or ``none``.
        num_workers: DataLoader worker processes per rank (lines are split between them).
        drop_last: drop each worker's last incomplete batch.
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self,
        train_paths: Union[str, List[str]],
        val_paths: Optional[Union[str, List[str]]] = None,
        test_paths: Optional[Union[str, List[str]]] = None,
        predict_paths: Optional[Union[str, List[str]]] = None,
        batch_size: int = 512,
        num_embeddings_per_feature: Union[int, List[int]] = 100_000,
        hash_seed: Optional[int] = 0,
        on_error: OnError = OnError.SKIP,
        dense_transform: DenseTransform = DenseTransform.LOG1P,
        num_workers: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"CriteoDataModule.batch_size must be a positive int, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"CriteoDataModule.num_workers must be an int >= 0, got {num_workers!r}")
        self.train_paths = train_paths
        self.val_paths, self.test_paths, self.predict_paths = val_paths, test_paths, predict_paths
        self.batch_size = batch_size
        self._num_embeddings = normalize_num_embeddings(num_embeddings_per_feature)
        self.hash_seed = hash_seed
        self.on_error = OnError.parse(on_error, "CriteoDataModule.on_error")
        self.dense_transform = DenseTransform.parse(dense_transform, "CriteoDataModule.dense_transform")
        self.num_workers, self.drop_last, self.pin_memory = num_workers, drop_last, pin_memory
        self.datasets: dict = {}
        # Record the per-table list, not a one-int shorthand: models built from this module record the list,
        # and Lightning refuses to log hparams that the model and the data module hold with different values.
        self.save_hyperparameters(ignore="num_embeddings_per_feature")
        self.hparams["num_embeddings_per_feature"] = self.num_embeddings_per_feature

    @property
    def num_dense_features(self) -> int:
        return NUM_DENSE_FEATURES

    @property
    def feature_names(self) -> List[str]:
        return list(FEATURE_NAMES)

    @property
    def num_embeddings_per_feature(self) -> List[int]:
        return list(self._num_embeddings)

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            add_callback_once(self.trainer, SkippedLinesMonitor())

    def _loader(self, stage: str, paths) -> ResumableLoader:
        if paths is None:
            raise ValueError(f"CriteoDataModule has no {stage}_paths; set data.{stage}_paths to run '{stage}'")
        # the Trainer's rank and world size (without a Trainer: the default process group's)
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else process_rank_world()
        )
        dataset = CriteoIterableDataset(
            paths,
            self.batch_size,
            self._num_embeddings,
            self.hash_seed,
            self.on_error,
            self.dense_transform,
            self.drop_last,
            rank=rank,
            world_size=world,
            max_workers=max(1, self.num_workers),
        )
        self.datasets[stage] = dataset  # kept so that callers can read dataset.stats
        consumed = fit_progress(self.trainer) if stage == "train" and self.trainer is not None else None
        return ResumableLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            consumed=consumed,
        )

    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train", self.train_paths)

    def val_dataloader(self):
        # No validation files: an empty list makes Lightning skip validation instead of failing.
        return [] if self.val_paths is None else self._loader("val", self.val_paths)

    def test_dataloader(self) -> ResumableLoader:
        return self._loader("test", self.test_paths)

    def predict_dataloader(self) -> ResumableLoader:
        return self._loader("predict", self.predict_paths)


class SkippedLinesMonitor(pl.Callback):
    """Logs how many lines of each pass the Criteo reader skipped as malformed, summed over ranks.

    At the end of each train / validation / test epoch: ``data/<stage>/skipped_lines`` (all reasons) and
    ``data/<stage>/skipped_lines/<reason>`` for every :class:`MalformedReason` (zeros included, so a clean
    file shows as 0 rather than as nothing). Reads ``trainer.datamodule.datasets[stage].stats``; does
    nothing for a data module without them. :class:`CriteoDataModule` adds one to its trainer.
    """

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dataset = getattr(trainer_datamodule(trainer), "datasets", {}).get(stage)
        if dataset is None:
            return
        malformed = dataset.stats.malformed
        metrics = {f"data/{stage}/skipped_lines": float(sum(malformed.values()))}
        metrics.update({f"data/{stage}/skipped_lines/{reason}": float(n) for reason, n in malformed.items()})
        for name, value in metrics.items():
            pl_module.log(name, value, reduce_fx="sum", sync_dist=True, on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "test")
