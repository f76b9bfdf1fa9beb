"""``Predictor``: scores batches from a serving store, at the store's current version, with hot reload.

It rebuilds the trained LightningModule from the class path and hyper-parameters stored with the dense
model (``cls(**hparams)``, as :meth:`LightningModule.load_from_checkpoint` does), loads the dense weights,
and for every batch reads the embedding rows of the batch's raw ids from the store in one read. The
module's embedding tables are replaced by the rows read (a compact table per table, ids renumbered), so the
module's own ``predict_step`` scores the batch: the same code as training's evaluation, with the rows of
one version. Ids the store does not hold (not admitted, expired or evicted ids of dynamic tables) are
dropped from their bags, as :class:`SparseStrategy` drops them at evaluation.

A lookup returns the version of its rows; when that differs from the loaded dense model's (a version was
applied meanwhile), the predictor reloads the dense model and reads again, so every score comes from one
version (``Predictor.version``).
"""

from __future__ import annotations

import importlib
import io
from typing import Any, Optional, Union

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.serving.format import SchemaMismatchError, TableSchema
from lightning_sparse.serving.stores.base import ServingStore, StoreUnavailableError, schema_difference
from lightning_sparse.typed_config import checkpoint_safe_types

_Bag = Union[nn.EmbeddingBag, nn.Embedding]
_RETRIES = 8  # lookups racing with applies before giving up (each apply is one version)


class Predictor:
    """Scores :class:`torchrec.datasets.utils.Batch`es from ``store`` (see the module docstring)."""

    def __init__(self, store: ServingStore) -> None:
        self.store = store
        self.version = 0
        self.module: Optional[LightningModule] = None
        self._features: dict[str, str] = {}
        self._bags: dict[str, _Bag] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Loads the dense model of the store's current version if it changed; returns whether it did."""
        version, blob = self.store.dense()
        if version == self.version:
            return False
        with torch.serialization.safe_globals([*checkpoint_safe_types()]):
            dense = torch.load(io.BytesIO(blob), weights_only=True)
        module = _build(dense["class_path"], dense["hparams"])
        bags = _embedding_bags(module)
        missing, unexpected = module.load_state_dict(dense["state_dict"], strict=False)
        tables = {f"{name}.weight" for name in bags}
        missing = [k for k in missing if not any(k.endswith("." + t) for t in tables)]
        if missing or unexpected:
            raise SchemaMismatchError(
                f"the dense model of version {version} does not fit {dense['class_path']}: missing {missing}, unexpected {unexpected}"
            )
        meta = self.store.meta()
        stored = meta.tables if meta is not None else {}
        schema = {
            name: TableSchema(int(bag.weight.shape[1]), stored.get(name, TableSchema(0, False)).dynamic)
            for name, bag in bags.items()
        }
        if meta is None or schema != meta.tables:
            raise SchemaMismatchError(
                f"{self.store.name} vs {dense['class_path']}: {schema_difference(stored, schema, version)}"
            )
        module.eval()
        self.module, self._bags, self.version = module, bags, version
        self._features = _features_of(module)
        return True

    @torch.no_grad()
    def predict(self, batch: Any) -> torch.Tensor:
        """Click probabilities of ``batch`` (the module's ``predict_step``) at one version of the store."""
        kjt = batch.sparse_features
        per_table = self._ids_by_table(kjt)
        unique = {table: np.unique(ids) for table, ids in per_table.items()}
        for _ in range(_RETRIES):
            snapshot = self.store.lookup(unique)
            if snapshot.version == self.version:
                break
            self.refresh()
        else:
            raise StoreUnavailableError(f"{self.store.name} changed version {_RETRIES} times during one lookup")
        for table, bag in self._bags.items():
            rows, found = snapshot.rows.get(table, (np.zeros((0, bag.weight.shape[1]), np.float32), np.zeros(0, bool)))
            bag.weight = nn.Parameter(torch.from_numpy(rows[found].copy()), requires_grad=False)
        remapped = self._remap(kjt, unique, snapshot)
        batch = type(batch)(dense_features=batch.dense_features, sparse_features=remapped, labels=batch.labels)
        if self.module is None:  # refresh() found no version: nothing was ever applied to the store
            raise StoreUnavailableError(f"{self.store.name} holds no model yet: apply a delta export first")
        return self.module.predict_step(batch, 0)

    def _ids_by_table(self, kjt: KeyedJaggedTensor) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {}
        for key in kjt.keys():
            if key not in self._features:
                raise SchemaMismatchError(
                    f"feature {key!r} of the batch is read by no table of the served model ({sorted(self._features)})"
                )
            out.setdefault(self._features[key], []).append(kjt[key].values().numpy())
        return {table: np.concatenate(parts).astype(np.int64) for table, parts in out.items()}

    def _remap(self, kjt: KeyedJaggedTensor, unique: dict[str, np.ndarray], snapshot: Any) -> KeyedJaggedTensor:
        """Raw ids -> positions in the compact tables; ids the store lacks leave their bags."""
        values, lengths, weights = [], [], []
        for key in kjt.keys():
            table = self._features[key]
            jt = kjt[key]
            found = snapshot.rows[table][1]
            compact = np.cumsum(found) - 1  # position among the found ids
            where = np.searchsorted(unique[table], jt.values().numpy())
            keep = torch.from_numpy(found[where])
            values.append(torch.from_numpy(compact[where])[keep])
            bags = torch.repeat_interleave(torch.arange(jt.lengths().numel()), jt.lengths().long())
            lengths.append(torch.bincount(bags[keep], minlength=jt.lengths().numel()).to(jt.lengths().dtype))
            if jt.weights_or_none() is not None:
                weights.append(jt.weights()[keep])
        return KeyedJaggedTensor(
            keys=kjt.keys(), values=torch.cat(values).long(), lengths=torch.cat(lengths),
            weights=torch.cat(weights) if weights else None,
        )  # fmt: skip


def _build(class_path: str, hparams: dict[str, Any]) -> LightningModule:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise SchemaMismatchError(
            f"the served model's class {class_path!r} cannot be imported here: {error}"
        ) from error
    # LightningCLI adds its own entries (``_class_path``, ``_instantiator``), as load_from_checkpoint knows
    arguments = {key: value for key, value in hparams.items() if not key.startswith("_")}
    try:
        return cls(**arguments)
    except TypeError as error:
        raise SchemaMismatchError(
            f"{class_path}(**hparams) failed: {error}. The module must save its constructor arguments "
            "(self.save_hyperparameters(), as lightning_sparse.models do)"
        ) from error


def _embedding_bags(module: nn.Module) -> dict[str, _Bag]:
    """Table name -> the nn.EmbeddingBag / nn.Embedding holding it (keyed by its state-dict path's end)."""
    out: dict[str, _Bag] = {}
    for sub in module.modules():
        if isinstance(sub, EmbeddingBagCollection):
            out.update({name: bag for name, bag in sub.embedding_bags.items()})
        elif isinstance(sub, EmbeddingCollection):
            out.update({name: bag for name, bag in sub.embeddings.items()})
    return out


def _features_of(module: nn.Module) -> dict[str, str]:
    out = {}
    for sub in module.modules():
        if isinstance(sub, EmbeddingBagCollection):
            configs = sub.embedding_bag_configs()
        elif isinstance(sub, EmbeddingCollection):
            configs = sub.embedding_configs()
        else:
            continue
        for config in configs:
            out.update({feature: config.name for feature in config.feature_names})
    return out
