"""Drifting click streams for ``dynamic_drift_quality.py``: each step a batch of (user, item, click).

Both streams are deterministic functions of their seed and are generated whole up front (every contender
trains on the same batches). Raw ids are scattered 62-bit values (a hash of the entity's index), as
production ids are; the entity index itself is kept for the full-size ceiling, which gives every entity
a row of its own. The click probability is ``sigmoid(bias + e_user + e_item + <v_user, v_item>)`` with
hidden per-entity effects, so a model must learn per-id rows (biases and a 4-d interaction) to score well.

``sliding``: the existing synthetic benchmark's stream. Users and items are Zipf(1.1)-distributed over a
window of popularity ranks that slides ``drift`` ranks per step: popular ids fade at a constant pace
and new ones arrive, but an id never comes back once it left the window.

``lifecycle``: shaped like real user/item activity. Items are born at random times (some before the
stream starts), rise to a heavy-tailed (Pareto) peak popularity after a log-normal time and fade
(popularity ``peak * x * exp(1 - x)``, ``x`` = age / rise time). Users join at random times, leave after
an exponential stay, and while present visit at a heavy-tailed (Pareto) rate, so they come back again
and again with gaps; a few heavy users make most of the traffic and most users are seen a few times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_sparse.dynamic.hashing import mix64

INTERACTION_DIM = 4


@dataclass
class Batch:
    """One step of a stream: raw ids and entity indices of users and items, and the clicks."""

    user_raw: torch.Tensor
    item_raw: torch.Tensor
    user_index: torch.Tensor
    item_index: torch.Tensor
    labels: torch.Tensor


@dataclass
class Stream:
    """A generated stream: its batches and the number of entities of each kind (rows of the full tables)."""

    name: str
    batches: list[Batch]
    users: int
    items: int

    def distinct(self) -> tuple[int, int]:
        """Distinct users and items that occur in the stream."""
        users = torch.cat([b.user_index for b in self.batches]).unique().numel()
        items = torch.cat([b.item_index for b in self.batches]).unique().numel()
        return users, items


def raw_ids(index: torch.Tensor, feature: int, seed: int) -> torch.Tensor:
    """The raw id of entity ``index`` of a feature: a scattered non-negative 62-bit value."""
    return (mix64(index * 2 + feature + seed * 1_000_003) >> 2) & ((1 << 62) - 1)


class Effects:
    """Hidden per-entity click effects: a bias ``N(0, 0.8)`` and a 4-d interaction vector ``N(0, 0.5)``."""

    def __init__(self, count: int, generator: torch.Generator) -> None:
        self.bias = 0.8 * torch.randn(count, generator=generator)
        self.vector = 0.5 * torch.randn(count, INTERACTION_DIM, generator=generator)


def clicks(users: Effects, items: Effects, u: torch.Tensor, i: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    logit = -1.0 + users.bias[u] + items.bias[i] + (users.vector[u] * items.vector[i]).sum(1)
    return torch.bernoulli(torch.sigmoid(logit), generator=g)


def sliding(steps: int, batch: int, seed: int, window: int = 50_000, drift: int = 125) -> Stream:
    """Zipf(1.1) over a window of ranks sliding ``drift`` ranks per step, independently for users and items."""
    g = torch.Generator().manual_seed(seed)
    entities = window + steps * drift
    users, items = Effects(entities, g), Effects(entities, g)
    ranks = torch.arange(1, window + 1, dtype=torch.float64)
    weights = ranks**-1.1
    batches = []
    for step in range(steps):
        u = torch.multinomial(weights, batch, replacement=True, generator=g) + step * drift
        i = torch.multinomial(weights, batch, replacement=True, generator=g) + step * drift
        batches.append(Batch(raw_ids(u, 0, seed), raw_ids(i, 1, seed), u, i, clicks(users, items, u, i, g)))
    return Stream("sliding", batches, entities, entities)


def pareto(count: int, alpha: float, cap: float, g: torch.Generator) -> torch.Tensor:
    """Pareto(alpha) samples with minimum 1, capped at ``cap``."""
    return (torch.rand(count, generator=g, dtype=torch.float64).clamp_min(1e-12) ** (-1.0 / alpha)).clamp_max(cap)


def lifecycle(steps: int, batch: int, seed: int, users: int = 150_000, items: int = 40_000) -> Stream:
    """Items that appear, peak and fade; users who join, come back at heavy-tailed rates, and leave."""
    g = torch.Generator().manual_seed(seed)
    user_effects, item_effects = Effects(users, g), Effects(items, g)
    # items: birth in [-0.3 T, T), rise time log-normal around T / 12, Pareto(1.2) peak
    birth = (torch.rand(items, generator=g, dtype=torch.float64) * 1.3 - 0.3) * steps
    rise = torch.exp(torch.randn(items, generator=g, dtype=torch.float64) * 0.7) * (steps / 12)
    peak = pareto(items, 1.2, 2_000.0, g)
    # users: join in [-0.5 T, T), stay Exponential(mean 0.6 T), visit at a Pareto(1.3) rate while present
    join = (torch.rand(users, generator=g, dtype=torch.float64) * 1.5 - 0.5) * steps
    leave = join - torch.log(torch.rand(users, generator=g, dtype=torch.float64).clamp_min(1e-12)) * 0.6 * steps
    rate = pareto(users, 1.3, 2_000.0, g)
    batches = []
    for step in range(steps):
        x = ((step - birth) / rise).clamp_min(0.0)
        item_weight = peak * x * torch.exp(1.0 - x)
        user_weight = torch.where((join <= step) & (step < leave), rate, torch.zeros_like(rate))
        u = torch.multinomial(user_weight, batch, replacement=True, generator=g)
        i = torch.multinomial(item_weight, batch, replacement=True, generator=g)
        labels = clicks(user_effects, item_effects, u, i, g)
        batches.append(Batch(raw_ids(u, 0, seed), raw_ids(i, 1, seed), u, i, labels))
    return Stream("lifecycle", batches, users, items)


STREAMS = {"sliding": sliding, "lifecycle": lifecycle}
