"""Data: the synthetic click stream, the Criteo reader and the batch type (torchrec's ``Batch``)."""

from torchrec.datasets.utils import Batch

from lightning_sparse.data.synthetic import SyntheticClickDataModule, SyntheticClickStream, feature_names

__all__ = ["Batch", "SyntheticClickDataModule", "SyntheticClickStream", "feature_names"]
