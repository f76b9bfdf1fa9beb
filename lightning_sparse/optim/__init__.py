"""Sparse (embedding) optimizers: mapping to fbgemm fused kinds and memory accounting."""

from lightning_sparse.optim.fbgemm_kinds import fused_optimizer_for, supported_kinds, unfused_optimizer_for

__all__ = ["fused_optimizer_for", "supported_kinds", "unfused_optimizer_for"]
