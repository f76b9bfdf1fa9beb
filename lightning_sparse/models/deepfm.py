"""DeepFM (Guo et al. 2017) as a LightningModule over TorchRec's DeepFM building blocks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchrec.models.deepfm import DenseArch, FMInteractionArch, SparseArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.data.synthetic import feature_names as default_feature_names
from lightning_sparse.models.base import (
    ClickModule,
    LearnedDenseVector,
    check_num_dense_features,
    embedding_bag_collection,
)


class DeepFMModule(ClickModule):
    """Factorization machine (all pairwise embedding dot products) plus a deep MLP over the same embeddings.

    Built from the archs of TorchRec's ``SimpleDeepFMNN`` (sparse, dense, FM interaction), with a linear
    head instead of its ``OverArch``: that one ends in a sigmoid, and :class:`ClickModule` needs logits
    (its loss is the numerically stable ``binary_cross_entropy_with_logits``).

    Args:
        num_embeddings_per_feature: rows of each feature's table (one table per sparse feature).
        embedding_dim: width of every table; the dense features are projected to this width too.
        num_dense_features: number of dense input features (0: none, see :class:`LearnedDenseVector`).
        hidden_layer_size: hidden width of the dense projection MLP.
        deep_fm_dimension: output width of the deep part of the interaction.
        feature_names: sparse feature keys (default ``cat_0 ..``, as the data modules produce).
        learning_rate: dense optimizer learning rate.
    """

    def __init__(
        self,
        num_embeddings_per_feature: list[int],
        embedding_dim: int = 16,
        num_dense_features: int = 13,
        hidden_layer_size: int = 64,
        deep_fm_dimension: int = 32,
        feature_names: Optional[list[str]] = None,
        learning_rate: float = 1e-3,
    ) -> None:
        super().__init__(learning_rate=learning_rate)
        if min(embedding_dim, hidden_layer_size, deep_fm_dimension) < 1:
            raise ValueError(
                "embedding_dim, hidden_layer_size and deep_fm_dimension must be >= 1, got "
                f"{embedding_dim}, {hidden_layer_size}, {deep_fm_dimension}"
            )
        self.save_hyperparameters()
        names = feature_names or default_feature_names(len(num_embeddings_per_feature))
        self.sparse_arch = SparseArch(embedding_bag_collection(num_embeddings_per_feature, embedding_dim, names))
        if num_dense_features == 0:
            self.dense_arch = LearnedDenseVector(embedding_dim)
        else:
            self.dense_arch = DenseArch(check_num_dense_features(num_dense_features), hidden_layer_size, embedding_dim)
        self.inter_arch = FMInteractionArch(
            fm_in_features=embedding_dim * (len(names) + 1),  # projected dense features + one embedding per feature
            sparse_feature_names=list(names),
            deep_fm_dimension=deep_fm_dimension,
        )
        # The interaction outputs [projected dense (D), deep part, FM term (1)].
        self.head = nn.Linear(embedding_dim + deep_fm_dimension + 1, 1)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        interaction = self.inter_arch(self.dense_arch(dense_features), self.sparse_arch(sparse_features))
        return self.head(interaction)
