"""Click-prediction LightningModules over TorchRec modules."""

from lightning_sparse.models.base import ClickModule
from lightning_sparse.models.dcn import DCNModule
from lightning_sparse.models.deepfm import DeepFMModule
from lightning_sparse.models.dlrm import DLRMModule

__all__ = ["ClickModule", "DCNModule", "DeepFMModule", "DLRMModule"]
