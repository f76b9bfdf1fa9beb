"""Click-prediction metrics that torchmetrics does not ship: log-loss and normalized entropy.

Both take predicted probabilities (like ``BinaryAUROC`` given probabilities), so one MetricCollection
update feeds all three.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def _log_loss_sum(probs: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Summed binary cross-entropy of predicted click probabilities (clamped away from 0 and 1)."""
    probs = probs.to(torch.float64).clamp(eps, 1 - eps)
    return torch.nn.functional.binary_cross_entropy(probs, labels, reduction="sum")


class NormalizedEntropy(Metric):
    """Log-loss divided by the entropy of the empirical click rate (NE, He et al. 2014).

    NE < 1 means the model beats always predicting the average click rate. States are sums, so the
    value is exact under distributed reduction.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("log_loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("positives", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(torch.float64)
        self.log_loss_sum += _log_loss_sum(probs, labels, self.eps)
        self.positives += labels.sum()
        self.count += labels.numel()

    def compute(self) -> torch.Tensor:
        p = (self.positives / self.count.clamp_min(1)).clamp(self.eps, 1 - self.eps)
        baseline = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
        return (self.log_loss_sum / self.count.clamp_min(1) / baseline).float()


class LogLoss(Metric):
    """Mean binary cross-entropy over all samples seen (exact under distributed reduction)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.total += _log_loss_sum(probs, labels.to(torch.float64), self.eps)
        self.count += labels.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()
