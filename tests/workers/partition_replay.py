"""The expected behaviour of a hash table split in partitions, replayed with one plain remapper per partition."""

import torch

from lightning_sparse.dynamic import DynamicIdRemapper, shard_of


def replay_partitions(
    reference: list[DynamicIdRemapper], ids: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What routed partitions must produce for ``ids``: each partition's plain remapper remaps the ids whose
    hash picks it. Returns (rows in training, rows of an evaluation lookup afterwards, assigned rows)."""
    part = shard_of(ids, len(reference))
    rows = torch.full_like(ids, -1)
    assigned = []
    for p, remapper in enumerate(reference):
        result = remapper.remap(ids[part == p], step, now=0.0)
        rows[part == p] = result.slots
        assigned.append(result.assigned)
        remapper.maybe_expire(step, now=0.0)
    looked_up = torch.full_like(ids, -1)
    for p, remapper in enumerate(reference):
        looked_up[part == p] = remapper.lookup(ids[part == p])
    return rows, looked_up, torch.cat(assigned)
