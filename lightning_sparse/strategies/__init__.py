"""Lightning strategies; importing this registers ``strategy="sparse"`` with Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_sparse.strategies.sparse import SparseStrategy

if SparseStrategy.strategy_name not in StrategyRegistry:
    SparseStrategy.register_strategies(StrategyRegistry)

__all__ = ["SparseStrategy"]
