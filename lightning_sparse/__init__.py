"""lightning_sparse: train recommendation models with sharded, sparsity-aware embedding tables in Lightning.

``Trainer(strategy="sparse")`` or ``Trainer(strategy=SparseStrategy(...))``.
"""

from lightning_sparse.config import ShardingType, SparseOptimizerConfig, SparseOptimizerKind, TableConfig
from lightning_sparse.strategies import SparseStrategy

__all__ = ["ShardingType", "SparseOptimizerConfig", "SparseOptimizerKind", "SparseStrategy", "TableConfig"]
__version__ = "0.1.0"
