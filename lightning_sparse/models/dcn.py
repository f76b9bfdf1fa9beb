"""DCN-v2 (Wang et al. 2021) as a LightningModule over TorchRec's ``DLRM_DCN`` network."""

from __future__ import annotations

from typing import Optional

import torch
from torchrec.models.dlrm import DLRM_DCN
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.data.synthetic import feature_names as default_feature_names
from lightning_sparse.models.base import (
    ClickModule,
    LearnedDenseVector,
    check_dlrm_layer_sizes,
    check_num_dense_features,
    embedding_bag_collection,
)


class DCNModule(ClickModule):
    """DLRM with the pairwise dot interaction replaced by a low-rank cross network (``LowRankCrossNet``).

    The cross network learns explicit bounded-degree feature crosses over the concatenated bottom-MLP
    output and embeddings, which the dot interaction only models to degree 2.

    Args:
        num_embeddings_per_feature: rows of each feature's table (one table per sparse feature).
        embedding_dim: width of every table; also the bottom MLP's output width.
        num_dense_features: number of dense input features (0: none, see :class:`LearnedDenseVector`).
        dense_arch_layer_sizes: bottom MLP widths; the last one must equal ``embedding_dim``.
        over_arch_layer_sizes: top MLP widths; the last one must be 1 (one logit).
        dcn_num_layers: number of cross layers.
        dcn_low_rank_dim: rank of each cross layer's weight factorisation ``W = U V``.
        feature_names: sparse feature keys (default ``cat_0 ..``, as the data modules produce).
        learning_rate: dense optimizer learning rate.
    """

    def __init__(
        self,
        num_embeddings_per_feature: list[int],
        embedding_dim: int = 16,
        num_dense_features: int = 13,
        dense_arch_layer_sizes: list[int] = [64, 16],  # noqa: B006 - YAML-friendly default, never mutated
        over_arch_layer_sizes: list[int] = [64, 32, 1],  # noqa: B006
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 16,
        feature_names: Optional[list[str]] = None,
        learning_rate: float = 1e-3,
    ) -> None:
        super().__init__(learning_rate=learning_rate)
        check_dlrm_layer_sizes(embedding_dim, dense_arch_layer_sizes, over_arch_layer_sizes)
        if dcn_num_layers < 1 or dcn_low_rank_dim < 1:
            raise ValueError(
                f"dcn_num_layers and dcn_low_rank_dim must be >= 1, got {dcn_num_layers}, {dcn_low_rank_dim}"
            )
        self.save_hyperparameters()
        names = feature_names or default_feature_names(len(num_embeddings_per_feature))
        self.dcn = DLRM_DCN(
            embedding_bag_collection=embedding_bag_collection(num_embeddings_per_feature, embedding_dim, names),
            dense_in_features=check_num_dense_features(num_dense_features),
            dense_arch_layer_sizes=list(dense_arch_layer_sizes),
            over_arch_layer_sizes=list(over_arch_layer_sizes),
            dcn_num_layers=dcn_num_layers,
            dcn_low_rank_dim=dcn_low_rank_dim,
        )
        if num_dense_features == 0:  # no bottom MLP input: a learned vector instead (see LearnedDenseVector)
            self.dcn.dense_arch = LearnedDenseVector(embedding_dim)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.dcn(dense_features, sparse_features)
