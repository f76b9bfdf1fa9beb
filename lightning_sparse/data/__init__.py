"""Data: the synthetic click stream, the Criteo reader, the streaming reader, the loader that checkpoints its
position, the batch type (torchrec's ``Batch``)."""

from torchrec.datasets.utils import Batch

from lightning_sparse.data.loading import ResumableLoader
from lightning_sparse.data.stream import (
    ChainedSource,
    IdTransform,
    IterableSource,
    ParquetSource,
    RecordSource,
    SparseColumn,
    StreamDataModule,
    StreamDataset,
    StreamRecordError,
    StreamSchema,
    SyntheticSource,
    TsvSource,
)
from lightning_sparse.data.synthetic import SyntheticClickDataModule, SyntheticClickStream, feature_names

__all__ = [
    "Batch", "ChainedSource", "IdTransform", "IterableSource", "ParquetSource", "RecordSource", "ResumableLoader",
    "SparseColumn", "StreamDataModule", "StreamDataset", "StreamRecordError", "StreamSchema", "SyntheticClickDataModule",
    "SyntheticClickStream", "SyntheticSource", "TsvSource", "feature_names",
]  # fmt: skip
