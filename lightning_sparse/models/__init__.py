"""Click-prediction LightningModules over TorchRec modules."""

from lightning_sparse.models.base import ClickModule
from lightning_sparse.models.dlrm import DLRMModule

__all__ = ["ClickModule", "DLRMModule"]
