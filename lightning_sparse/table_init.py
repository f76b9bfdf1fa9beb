"""Embedding tables built on the meta device, with their initial values reproducible shard by shard.

A model whose tables exceed one process's memory cannot build them on the host first. TorchRec's
``EmbeddingBagCollection`` built on CPU draws from the global generator: ``normal_`` for every table
(``nn.EmbeddingBag``'s own init), then ``uniform_(-sqrt(1/rows), sqrt(1/rows))`` (the config's default
``init_fn``) for every table, in table order. torch's CPU ``uniform_`` on float32 draws one 32-bit
mt19937 number per element, serially in memory order, so any row range of a table can be regenerated
from the generator state captured where the table's draw began (``tests/test_table_init.py`` checks
this against a CPU build). :func:`meta_embedding_bag_collection` therefore builds the collection on
``meta``, records a :class:`TableInit` per table (as the config's ``init_fn``) and advances the global
generator exactly as the CPU build would, in bounded chunks, so layers built afterwards get the same
weights. Each rank later fills only its shards (``distributed/materialise.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType

# Elements drawn per chunk: bounds the memory of replaying and advancing a table (4 MiB of float32).
CHUNK_ELEMENTS = 1 << 20
# Below this many elements torch's CPU normal_ takes a scalar path (two 64-bit draws per pair, cached).
_NORMAL_VECTOR_MIN = 16


def draw(generator: torch.Generator, count: int) -> None:
    """Advances ``generator`` by ``count`` 32-bit numbers (one float32 ``uniform_`` element each)."""
    if count <= 0:
        return
    buffer = torch.empty(min(count, CHUNK_ELEMENTS), device="cpu")  # explicit: a torch.device context may be active
    while count > 0:
        n = min(count, buffer.numel())
        buffer[:n].uniform_(generator=generator)
        count -= n


def advance_like_normal(generator: torch.Generator, numel: int) -> None:
    """Advances ``generator`` as a float32 ``normal_`` of ``numel`` elements would: from 16 elements on,
    torch draws one 32-bit number per element plus 16 more when ``numel`` is not a multiple of 16 (it
    recomputes the last 16 values); tiny tensors are simply drawn."""
    if numel < _NORMAL_VECTOR_MIN:
        torch.empty(numel, device="cpu").normal_(generator=generator)
    else:
        draw(generator, numel + (_NORMAL_VECTOR_MIN if numel % _NORMAL_VECTOR_MIN else 0))


@dataclass
class TableInit:
    """A table's ``uniform_(low, high)`` draw, replayable for any block of rows and columns.

    ``state`` is the CPU generator state where the full table's draw began: :meth:`fill` regenerates any
    block of the values a CPU build would have drawn. It is the table config's ``init_fn``.
    """

    low: float
    high: float
    state: torch.Tensor

    def fill(
        self, out: torch.Tensor, row_offset: int = 0, col_offset: int = 0, table_dim: Optional[int] = None
    ) -> None:
        """Writes rows ``[row_offset, row_offset + out.shape[0])`` and columns ``[col_offset, col_offset +
        out.shape[1])`` of the table (``table_dim`` columns wide) into ``out``, drawing in bounded chunks:
        the rows before the block are drawn and dropped, a column block is cut from full-width rows."""
        dim = out.shape[1] if table_dim is None else table_dim
        generator = torch.Generator(device="cpu")
        generator.set_state(self.state)
        draw(generator, row_offset * dim)
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(dim, 1))
        direct = (
            col_offset == 0
            and out.shape[1] == dim
            and out.dtype == torch.float32
            and out.is_contiguous()
            and out.device.type == "cpu"
        )  # else drawn on the host (the CPU generator) and copied
        buffer = None if direct else torch.empty(min(rows_per_chunk, out.shape[0]) * dim, device="cpu")
        with torch.no_grad():
            for start in range(0, out.shape[0], rows_per_chunk):
                n = min(rows_per_chunk, out.shape[0] - start)
                if direct:
                    out[start : start + n].uniform_(self.low, self.high, generator=generator)
                else:
                    rows = buffer[: n * dim].view(n, dim).uniform_(self.low, self.high, generator=generator)
                    out[start : start + n].copy_(rows[:, col_offset : col_offset + out.shape[1]])

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """Exactly TorchRec's default ``init_fn`` (``uniform_`` from the global generator): TorchRec calls it
        on the parameters it allocates (its sharded modules do, on whatever each rank holds), and those
        draws must stay as they were; :meth:`fill` replays the table's recorded values."""
        return torch.nn.init.uniform_(weight, a=self.low, b=self.high)


def default_uniform_bounds(config: EmbeddingBagConfig) -> Optional[tuple[float, float]]:
    """The bounds of TorchRec's default ``init_fn`` (``partial(uniform_, a=.., b=..)``), or None when the
    config carries another initialiser."""
    fn = config.init_fn
    if isinstance(fn, functools.partial) and fn.func is torch.nn.init.uniform_ and not fn.args:
        return float(fn.keywords["a"]), float(fn.keywords["b"])
    return None


def meta_embedding_bag_collection(
    tables: list[EmbeddingBagConfig], is_weighted: bool = False
) -> EmbeddingBagCollection:
    """An EmbeddingBagCollection on ``meta`` whose tables, materialised (whole or shard by shard), hold
    exactly what ``EmbeddingBagCollection(tables, device="cpu")`` would have drawn, and which leaves the
    global generator where that build would have left it. Each config's ``init_fn`` becomes its
    :class:`TableInit`; configs must use TorchRec's default initialiser in float32."""
    generator = torch.default_generator
    bounds = []
    for config in tables:
        found = default_uniform_bounds(config)
        if found is None or config.data_type is not DataType.FP32:
            raise ValueError(
                f"Table {config.name!r}: meta_embedding_bag_collection replays TorchRec's default float32 "
                f"uniform initialiser only (this config has init_fn={config.init_fn!r}, data_type={config.data_type}). "
                "Build this collection on CPU instead (its weights are then copied into the shards), or pass "
                "it on meta yourself: its init_fn is then applied to each shard, so values depend on the placement."
            )
        bounds.append(found)
    for config in tables:  # nn.EmbeddingBag.__init__ draws normal_ for every table first
        advance_like_normal(generator, config.num_embeddings * config.embedding_dim)
    for config, (low, high) in zip(tables, bounds):  # then reset_parameters draws each init_fn in order
        config.init_fn = TableInit(low, high, generator.get_state())
        draw(generator, config.num_embeddings * config.embedding_dim)
    return EmbeddingBagCollection(tables=tables, is_weighted=is_weighted, device=torch.device("meta"))


def materialise_on_host(model: nn.Module) -> bool:
    """Gives every embedding table of ``model`` still on ``meta`` its full weight on the CPU: a
    :class:`TableInit` replays a CPU build's values, another ``init_fn`` is called on the full weight.
    For running a model without SparseStrategy, which shards the tables instead; returns whether anything
    was materialised."""
    from torchrec import EmbeddingCollection

    done = False
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            configs, container = module.embedding_bag_configs(), module.embedding_bags
        elif isinstance(module, EmbeddingCollection):
            configs, container = module.embedding_configs(), module.embeddings
        else:
            continue
        on_meta = [c for c in configs if container[c.name].weight.device.type == "meta"]
        for config in on_meta:
            table = container[config.name]
            table.weight = nn.Parameter(
                torch.empty(table.weight.shape, dtype=table.weight.dtype, device="cpu"),
                requires_grad=table.weight.requires_grad,
            )
            with torch.no_grad():
                if isinstance(config.init_fn, TableInit):
                    config.init_fn.fill(table.weight)
                else:
                    config.init_fn(table.weight)
        if on_meta:
            done = True
            module._device = torch.device("cpu")  # TorchRec reads it (e.g. when sharding); it said meta
    return done
