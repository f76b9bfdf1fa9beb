"""Sparse (embedding) optimizers: which tables fbgemm fuses exactly, exact row gradients and our row kernels
for the rest (native and data-parallel routes), and memory accounting."""

from lightning_sparse.optim.fbgemm_kinds import fused_blocker, fused_optimizer_for, supported_kinds
from lightning_sparse.optim.kernels import init_state, init_state_for, sparse_update, sparse_update_for
from lightning_sparse.optim.memory import MemoryReport, TableMemory, memory_report
from lightning_sparse.optim.sparse_row_optimizer import SparseRowOptimizer, sparse_rows

__all__ = [
    "MemoryReport",
    "TableMemory",
    "memory_report",
    "SparseRowOptimizer",
    "fused_blocker",
    "fused_optimizer_for",
    "init_state",
    "init_state_for",
    "sparse_rows",
    "sparse_update",
    "sparse_update_for",
    "supported_kinds",
]
