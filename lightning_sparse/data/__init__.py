"""Data: the synthetic click stream, the Criteo reader, the loader that checkpoints its position, the batch type (torchrec's ``Batch``)."""

from torchrec.datasets.utils import Batch

from lightning_sparse.data.loading import ResumableLoader
from lightning_sparse.data.synthetic import SyntheticClickDataModule, SyntheticClickStream, feature_names

__all__ = ["Batch", "ResumableLoader", "SyntheticClickDataModule", "SyntheticClickStream", "feature_names"]
