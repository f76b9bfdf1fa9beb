"""Prequential (test-then-train) click metrics: AUC, log-loss and NE, cumulative and over a sliding window.

:class:`PrequentialState` holds what one rank has scored; :meth:`PrequentialState.compute` sums it over all
ranks with fixed-size all-reduces, so every number is over the union of the ranks' predictions (not a mean
of per-rank values) and costs the same however long the stream has run.

AUC comes from histograms of the predicted logits, positives and negatives apart, in ``bins`` equal bins of
[-16, 16] (probabilities from 1e-7 to 1 - 1e-7; logits beyond go to the end bins): the AUC of the scores
rounded down to their bin (ties counted half, as torchmetrics does), exact for those scores. A histogram is
what makes a cumulative AUC over an endless stream possible (storing every prediction is not); rounding
changes the AUC only through pairs of a positive and a negative in the same bin, by at most half their share
of all positive-negative pairs. Bins of equal logit width are finest where click rates live: with the
default 2**16 bins, a bin at probability 0.01 is 5e-6 wide, at 0.5 1.2e-4.
Log-loss and NE are float64 sums, as :class:`~lightning_sparse.models.metrics.LogLoss` and
:class:`~lightning_sparse.models.metrics.NormalizedEntropy` compute them.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from lightning_sparse.models.metrics import _log_loss_sum

_EPS = 1e-12
LOGIT_RANGE = 16.0  # the histograms cover logits in [-LOGIT_RANGE, LOGIT_RANGE]


def histogram_auc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """AUC of scores given as per-bin counts of positives and negatives (bins in increasing score order).

    Each positive wins over every negative in a lower bin and half of those in its own bin. NaN when one
    class is absent (the AUC is undefined).
    """
    positives, negatives = positives.double(), negatives.double()
    total_pos, total_neg = positives.sum(), negatives.sum()
    if total_pos == 0 or total_neg == 0:
        return math.nan
    below = torch.cumsum(negatives, 0) - negatives
    return float(((positives * (below + 0.5 * negatives)).sum() / (total_pos * total_neg)).item())


def normalized_entropy(log_loss_sum: float, positives: float, count: float) -> float:
    """Mean log-loss over the entropy of the empirical click rate (NE; NaN with no samples)."""
    if count == 0:
        return math.nan
    p = min(max(positives / count, _EPS), 1 - _EPS)
    return (log_loss_sum / count) / -(p * math.log(p) + (1 - p) * math.log(1 - p))


class PrequentialState:
    """One rank's scored samples: cumulative histograms and sums, plus the last ``window`` batches' scores.

    Args:
        window: batches in the sliding window (each batch counts once, whatever the number of ranks).
        bins: histogram bins of the logits over [-16, 16].
    """

    def __init__(self, window: int = 100, bins: int = 1 << 16) -> None:
        if window < 1 or bins < 2:
            raise ValueError(f"PrequentialEvaluation needs window >= 1 and bins >= 2, got window={window}, bins={bins}")
        self.window, self.bins = window, bins
        self.reset()

    def reset(self) -> None:
        self.batches = 0  # batches scored since the fit started (the same count on every rank)
        self.histogram = torch.zeros(2, self.bins, dtype=torch.int64)  # [negatives, positives]
        self.sums = torch.zeros(3, dtype=torch.float64)  # log-loss sum, positives, count
        # (batch number, bin of every sample, label of every sample, log-loss sum) of the last `window` batches
        self.recent: deque = deque()

    def bin_of(self, logits: torch.Tensor) -> torch.Tensor:
        """The histogram bin of each logit (increasing with the logit, so with the predicted probability)."""
        scaled = (logits.double().clamp(-LOGIT_RANGE, LOGIT_RANGE) + LOGIT_RANGE) * (self.bins / (2 * LOGIT_RANGE))
        return scaled.floor().clamp_(0, self.bins - 1).long()

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Scores one batch of this rank (logits before the update, labels 0/1)."""
        logits, labels = logits.detach().reshape(-1).cpu(), labels.detach().reshape(-1).cpu()
        probs = torch.sigmoid(logits.double())
        bins, positive = self.bin_of(logits), labels.round().long()
        self.histogram.index_put_((positive, bins), torch.ones_like(bins), accumulate=True)
        loss = float(_log_loss_sum(probs, labels.double(), _EPS))
        self.sums += torch.tensor([loss, float(positive.sum()), float(positive.numel())], dtype=torch.float64)
        self.batches += 1
        self.recent.append((self.batches, bins.to(torch.int32), positive.to(torch.uint8), loss))
        self._trim()

    def _trim(self) -> None:
        while self.recent and self.recent[0][0] <= self.batches - self.window:
            self.recent.popleft()

    def _window_local(self) -> tuple[torch.Tensor, torch.Tensor]:
        histogram = torch.zeros(2, self.bins, dtype=torch.int64)
        sums = torch.zeros(3, dtype=torch.float64)
        for _, bins, positive, loss in self.recent:
            histogram.index_put_(
                (positive.long(), bins.long()), torch.ones_like(bins, dtype=torch.int64), accumulate=True
            )
            sums += torch.tensor([loss, float(positive.sum()), float(positive.numel())], dtype=torch.float64)
        return histogram, sums

    def compute(self, device: torch.device) -> dict[str, float]:
        """The metrics over all ranks (a collective when a process group exists: every rank must call it)."""
        window_histogram, window_sums = self._window_local()
        counts = torch.stack([self.histogram, window_histogram]).to(device)
        sums = torch.stack([self.sums, window_sums]).to(device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        counts, sums = counts.cpu(), sums.cpu().tolist()
        out: dict[str, float] = {}
        for prefix, (negatives, positives), (loss, pos, count) in zip(("", "window_"), counts, sums):
            out[f"{prefix}auc"] = histogram_auc(positives, negatives)
            out[f"{prefix}logloss"] = loss / count if count else math.nan
            out[f"{prefix}ne"] = normalized_entropy(loss, pos, count)
            out[f"{prefix}samples"] = count
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self, rank_world: tuple[int, int]) -> dict[str, Any]:
        """Every rank's state (a collective: Lightning asks every rank for it when it saves a checkpoint).

        Resumed on as many processes, each rank takes its own back, so the float64 sums add up in the same
        order as in a run that never stopped (bit for bit). On another number of processes rank 0 takes all
        ranks' states merged and the others start from zero: every sum over ranks is what it was.
        """
        rank, world = rank_world
        recent = [(b, bins.clone(), positive.clone(), loss) for b, bins, positive, loss in self.recent]
        mine = {"histogram": self.histogram.clone(), "sums": self.sums.clone(), "recent": recent}
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        return {"window": self.window, "bins": self.bins, "batches": self.batches, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any], rank_world: tuple[int, int]) -> None:
        if state["bins"] != self.bins:
            raise ValueError(
                f"The checkpoint's prequential histograms have {state['bins']} bins; this PrequentialEvaluation has "
                f"bins={self.bins}. Resume with bins={state['bins']}."
            )
        rank, world = rank_world
        self.reset()
        self.batches = int(state["batches"])
        ranks = state["ranks"]
        if len(ranks) == world:
            mine = ranks[rank]
        elif rank == 0:
            by_batch: dict[int, list] = {}
            for saved in ranks:
                for b, bins, positive, loss in saved["recent"]:
                    by_batch.setdefault(b, []).append((bins, positive, loss))
            merged = [
                (b, torch.cat([e[0] for e in entries]), torch.cat([e[1] for e in entries]), sum(e[2] for e in entries))
                for b, entries in sorted(by_batch.items())
            ]
            mine = {
                "histogram": sum(r["histogram"] for r in ranks),
                "sums": sum(r["sums"] for r in ranks),
                "recent": merged,
            }
        else:
            return
        self.histogram, self.sums = mine["histogram"].clone(), mine["sums"].clone()
        self.recent = deque((int(b), bins, positive, float(loss)) for b, bins, positive, loss in mine["recent"])
        self._trim()  # a smaller window than the checkpoint's keeps its last batches only
