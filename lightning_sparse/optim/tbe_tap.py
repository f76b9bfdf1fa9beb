"""Runs any sparse kind inside a TorchRec-sharded table on CPU, where fbgemm only fuses SGD/Adagrad/row-wise Adagrad.

fbgemm's CPU TBE has no gradient-only mode (``EmbOptimType.NONE`` asserts CUDA + device placement), and the
``dense`` compute kernel yields a whole-table dense gradient. So the table is sharded with the fused
``EXACT_SGD`` at learning rate ``GRADIENT_SCALE`` (2^20) and a :class:`TBEGradientTap` on its TBE module:
the forward pre-hook snapshots the rows the batch touches (O(batch), never the table); after backward the
fused step has written ``w - 2^20 * g`` there, so ``g = (snapshot - w) / 2^20`` is the deduplicated row
gradient (relative error ~1e-7: the scaled step dwarfs the weight), the rows are restored bit-exactly from
the snapshot and :func:`sparse_update` applies the real rule. One forward per backward (no gradient
accumulation across forwards); no variable batch size or per-sample weights.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sparse.config import SparseOptimizerConfig
from lightning_sparse.optim.kernels import init_state_for, sparse_update_for

GRADIENT_SCALE = 2.0**20


def find_tbes(module: torch.nn.Module) -> list[Any]:
    """The fbgemm training TBEs inside a (sharded) module, each once (TorchRec keeps them in plain lists)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    found: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if depth > 32 or id(obj) in found:  # DMP -> DDP -> LightningModule -> ... -> lookup -> TBE is deep
            return
        if isinstance(obj, SplitTableBatchedEmbeddingBagsCodegen):
            found[id(obj)] = obj
            return
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, torch.nn.Module):
            for child in obj.children():
                visit(child, depth + 1)
            for name in ("_lookups", "_emb_modules", "_emb_module"):
                if name in vars(obj):
                    visit(vars(obj)[name], depth + 1)

    visit(module, 0)
    return list(found.values())


class TBEGradientTap:
    """Recovers per-row gradients from one fused-SGD TBE and applies a :class:`SparseOptimizerConfig` per table."""

    def __init__(self, tbe: Any, configs: list[SparseOptimizerConfig]) -> None:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        if tbe.optimizer != EmbOptimType.EXACT_SGD or tbe.get_learning_rate() != GRADIENT_SCALE:
            raise ValueError(
                f"TBEGradientTap needs the table sharded with fused SGD at lr={GRADIENT_SCALE} "
                f"(got {tbe.optimizer}, lr={tbe.get_learning_rate()})"
            )
        self.tbe = tbe
        self.weights: list[Tensor] = tbe.split_embedding_weights()
        if len(configs) != len(self.weights):
            raise ValueError(f"one config per table: {len(self.weights)} tables, {len(configs)} configs")
        self.configs = configs
        self.states = [init_state_for(c, w) for c, w in zip(configs, self.weights)]
        self.feature_table_map: list[int] = list(tbe.feature_table_map)
        self._snapshot: Optional[list[tuple[Tensor, Tensor]]] = None
        self._handle = tbe.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        indices = args[0] if len(args) > 0 else kwargs["indices"]
        offsets = args[1] if len(args) > 1 else kwargs["offsets"]
        features = len(self.feature_table_map)
        batch = (offsets.numel() - 1) // features
        if batch * features != offsets.numel() - 1:
            raise ValueError("TBEGradientTap does not support variable batch sizes per feature")
        ids: list[list[Tensor]] = [[] for _ in self.weights]
        for f, t in enumerate(self.feature_table_map):
            ids[t].append(indices[int(offsets[f * batch]) : int(offsets[(f + 1) * batch])].long())
        snapshot = []
        for t, weight in enumerate(self.weights):
            rows = torch.unique(torch.cat(ids[t])) if ids[t] else torch.empty(0, dtype=torch.long)
            snapshot.append((rows, weight[rows].clone()))
        self._snapshot = snapshot

    @torch.no_grad()
    def step(self) -> None:
        """After backward: recover the row gradients, restore the rows, apply each table's rule."""
        if self._snapshot is None:
            return
        for t, (rows, before) in enumerate(self._snapshot):
            weight = self.weights[t]
            grad = (before - weight[rows]) / GRADIENT_SCALE
            weight[rows] = before
            sparse_update_for(self.configs[t], weight, self.states[t], rows, grad)
        self._snapshot = None

    def remove(self) -> None:
        self._handle.remove()
