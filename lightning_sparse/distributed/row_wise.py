"""Row-wise sharding (DES) on every backend: a table's rows split over ranks, partial pooled sums aggregated.

A ``row_wise`` table keeps rows ``[k * N / W, (k + 1) * N / W)`` on rank ``k`` (``table_row_wise``: split over
the ranks of one host). Each step TorchRec's row-wise sharding sends every id to the rank owning its row
(``all_to_all`` of the bucketized ids), each rank pools the rows it holds into a *partial* sum per
(sample, feature) for the whole global batch, and the partial sums are added up and scattered back to the
samples' ranks (``reduce_scatter``; an uneven split goes through ``all_to_all`` and a local sum). What travels
is one pooled vector per sample and feature, not the rows: DES's partial-result aggregation. In backward the
gradient of each pooled vector is gathered to every rank holding a part of it (``all_gather``), turned into
row gradients by fbgemm's fused backward and applied by the fused optimizer on the row's owner (or, for kinds
fbgemm does not fuse, by lightning_sparse's kernels on the owner's block, with state sharded by row blocks:
``optim/native_kernel_optimizer.py``).

All of that is TorchRec's (``sharding/rw_sharding.py``, ``twrw_sharding.py``, ``comm_ops.py``) and runs on CPU
process groups too: gloo has ``reduce_scatter_tensor``, ``all_gather_into_tensor`` and ``all_to_all_single`` with
uneven splits. TorchRec only refuses it on CPU because ``EmbeddingBagCollectionSharder.sharding_types`` lists
``row_wise`` and ``table_row_wise`` for CUDA alone; the sharders below add them for every device type. Nothing
else is re-built here.

**Gradient semantics, one for every sharding type.** Each rank's loss is the mean over its own samples; the
dense layers get DDP's mean over ranks of those gradients. TorchRec's collectives divide the gradient they
carry back by the world size (``comm_ops.GRADIENT_DIVISION``, on by default) in every sharding type
(table-, column-, row-wise all-to-all and reduce-scatter alike), so every embedding row too gets the mean over
ranks of the gradients of the ranks' losses: exactly what one process training on the concatenated global
batch with the loss ``mean over ranks of each rank's mean loss`` would get. ``data_parallel`` tables get the same
from DDP's averaged all-reduce. Turning the division off (``set_gradient_division(False)``) would give sharded
tables ``W`` times that gradient while dense layers and data-parallel tables keep the mean, so the strategy
refuses it (:func:`check_gradient_division`). ``tests/test_row_wise.py`` trains every sharding type against one
unsharded reference of this rule.
"""

from __future__ import annotations

from typing import List

from torchrec.distributed import comm_ops
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

from lightning_sparse.config import ShardingType

ROW_WISE_TYPES = (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)


class EmbeddingBagCollectionRowWiseSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EmbeddingBagCollection sharder with ``row_wise`` and ``table_row_wise`` on every device type
    (TorchRec lists them for CUDA only; its row-wise sharding and fused CPU kernel run on CPU unchanged)."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = list(super().sharding_types(compute_device_type))
        return types + [t.value for t in ROW_WISE_TYPES if t.value not in types]


class EmbeddingCollectionRowWiseSharder(EmbeddingCollectionSharder):
    """TorchRec's EmbeddingCollection sharder; it already offers ``row_wise`` on every device type (sequence
    tables have no ``table_row_wise`` in TorchRec). Kept as its own class so both sharders come from here."""


def check_gradient_division() -> None:
    """Refuses TorchRec's gradient division turned off: it would give sharded tables ``world_size`` times the
    gradient that data-parallel tables and dense layers get (see the module docstring)."""
    if not comm_ops.get_gradient_division():
        raise ValueError(
            "torchrec.distributed.comm_ops.set_gradient_division(False) was called: sharded embedding tables would "
            "get the sum over ranks of the gradients while dense layers and data_parallel tables get DDP's mean. "
            "lightning_sparse trains every table with the mean over ranks; call set_gradient_division(True) "
            "(TorchRec's default), and scale the sparse learning rate by the world size if the sum was wanted."
        )


def row_wise_sharders() -> list:
    """The sharders SparseStrategy hands TorchRec's planner and DistributedModelParallel."""
    check_gradient_division()
    return [EmbeddingBagCollectionRowWiseSharder(), EmbeddingCollectionRowWiseSharder()]
