"""Filling each rank's table shards with the tables' initial values, after DistributedModelParallel.

DMP allocates only the local shards of sharded tables (and whole data-parallel tables) and initialises
them itself; this writes the values each table's resolved ``init`` (:class:`~lightning_sparse.config.
TableInitKind`) asks for into those shards, reading or generating only the shard's rows and columns in
bounded chunks, so no rank ever holds a full copy of a table it has no shard of.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from lightning_sparse import table_init
from lightning_sparse.config import ResolvedTable, TableInitKind
from lightning_sparse.distributed.routes import EmbeddingTables


def local_pieces(target: torch.Tensor) -> Iterator[tuple[torch.Tensor, int, int]]:
    """The local parts of a table's state-dict entry with their first row and column in the table: a
    ShardedTensor's local shards, or the whole tensor (data-parallel tables, one process)."""
    if isinstance(target, ShardedTensor):
        for shard in target.local_shards():
            (row, col) = shard.metadata.shard_offsets
            yield shard.tensor, int(row), int(col)
    else:
        yield target, 0, 0


def fill_piece(table: ResolvedTable, piece: torch.Tensor, row: int, col: int) -> None:
    """Writes rows ``[row, row + piece.shape[0])``, columns ``[col, col + piece.shape[1])`` of ``table``'s
    initial values into ``piece``."""
    rows, cols = piece.shape
    if rows == 0 or cols == 0:
        return
    with torch.no_grad():
        if table.init is TableInitKind.COPY:
            piece.copy_(table.initialiser[row : row + rows, col : col + cols])
        elif table.init is TableInitKind.REPLAY:
            table.initialiser.fill(piece, row, col, table.dim)
        elif table.init is TableInitKind.INIT_FN:
            table.initialiser(piece)  # the user's init_fn, per shard: values depend on the placement
        else:
            _read_pretrained(table.initialiser, piece, row, col)


def _read_pretrained(path: str, piece: torch.Tensor, row: int, col: int) -> None:
    """Copies the block from the memory-mapped ``.npy`` file in row chunks (checked in ``resolve_tables``)."""
    array = np.load(path, mmap_mode="r")
    rows, cols = piece.shape
    step = max(1, table_init.CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = np.ascontiguousarray(array[row + start : row + start + n, col : col + cols])
        piece[start : start + n].copy_(torch.from_numpy(block))


def materialise_shards(model: nn.Module, tables: EmbeddingTables) -> None:
    """Fills every local shard of every table of the sharded ``model`` from its resolved initialisation,
    then releases the pre-sharding weights (host copies or meta placeholders)."""
    state = model.state_dict(keep_vars=True)
    for table in tables.tables.values():
        for piece, row, col in local_pieces(state[table.param_path]):
            fill_piece(table, piece, row, col)
        if table.init is TableInitKind.COPY:
            table.initialiser = None  # the full host weight: let it go with the module's reference
    tables.weights.clear()
