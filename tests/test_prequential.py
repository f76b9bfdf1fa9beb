"""PrequentialEvaluation in one process, and the models without dense features.

The numbers are checked against torchmetrics' exact binary AUROC and plain log-loss/NE over the gathered
predictions; the 2-process version (union of the ranks' predictions, resume through a checkpoint) is in
tests/test_stream_prequential_ranks.py.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

import lightning_sparse
from lightning_sparse.callbacks import PrequentialEvaluation
from lightning_sparse.config import SparseOptimizerConfig
from lightning_sparse.data import SparseColumn, StreamDataModule, StreamSchema, SyntheticSource
from lightning_sparse.models import DCNModule, DeepFMModule, DLRMModule
from lightning_sparse.models.base import LearnedDenseVector
from lightning_sparse.models.prequential import PrequentialState, histogram_auc
from lightning_sparse.plotting import PANELS, plot_training_curves


def reference(logits: torch.Tensor, labels: torch.Tensor, bins: int) -> dict[str, float]:
    logits, labels = logits.double(), labels.double()
    index = ((logits.clamp(-16, 16) + 16) * (bins / 32)).floor().clamp(0, bins - 1)
    probs = torch.sigmoid(logits)
    loss = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-12, 1 - 1e-12), labels).item()
    p = labels.mean().item()
    return {
        "auc": binary_auroc(index / bins, labels.long()).item(), "exact_auc": binary_auroc(probs, labels.long()).item(),
        "logloss": loss, "ne": loss / -(p * math.log(p) + (1 - p) * math.log(1 - p)), "samples": float(labels.numel()),
    }  # fmt: skip


def check(got: dict[str, float], want: dict[str, float], prefix: str = "") -> None:
    for key in ("auc", "logloss", "ne", "samples"):
        # torchmetrics returns the AUC as float32
        assert got[prefix + key] == pytest.approx(want[key], abs=1e-6 if key == "auc" else 1e-9), prefix + key


def stream(seed: int, steps: int, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        labels = (torch.rand(size, generator=g) < 0.3).float()
        out.append((torch.randn(size, generator=g) * 2 + labels, labels))
    return out


def test_histogram_auc_is_torchmetrics_auroc_of_the_binned_scores_and_undefined_with_one_class():
    g = torch.Generator().manual_seed(0)
    bins = torch.randint(0, 50, (2000,), generator=g)  # many ties
    labels = (torch.rand(2000, generator=g) < bins / 60).long()
    positives, negatives = (
        torch.bincount(bins[labels == 1], minlength=50),
        torch.bincount(bins[labels == 0], minlength=50),
    )
    assert histogram_auc(positives, negatives) == pytest.approx(binary_auroc(bins / 50, labels).item(), abs=1e-6)
    assert math.isnan(histogram_auc(positives, torch.zeros(50)))


def test_cumulative_and_window_values_and_an_exact_resume_from_the_state():
    batches = stream(1, 9)
    state = PrequentialState(window=4, bins=1 << 12)
    for step, (logits, labels) in enumerate(batches, 1):
        state.update(logits, labels)
        got = state.compute(torch.device("cpu"))
        check(
            got,
            reference(torch.cat([b[0] for b in batches[:step]]), torch.cat([b[1] for b in batches[:step]]), 1 << 12),
        )
        recent = batches[max(0, step - 4) : step]
        check(got, reference(torch.cat([b[0] for b in recent]), torch.cat([b[1] for b in recent]), 1 << 12), "window_")
        if step == 5:
            saved = state.state_dict((0, 1))
    resumed = PrequentialState(window=4, bins=1 << 12)
    resumed.load_state_dict(saved, (0, 1))
    for logits, labels in batches[5:]:
        resumed.update(logits, labels)
    assert resumed.compute(torch.device("cpu")) == state.compute(torch.device("cpu"))  # bit for bit
    with pytest.raises(ValueError, match="4096 bins; this PrequentialEvaluation has bins=1024. Resume with bins=4096"):
        PrequentialState(bins=1 << 10).load_state_dict(saved, (0, 1))


def test_a_two_rank_state_resumes_on_one_process_with_the_union_of_both_ranks():
    ranks = [PrequentialState(window=3, bins=1 << 12) for _ in range(2)]
    data = [stream(10 + r, 6) for r in range(2)]
    for step in range(6):
        for r in range(2):
            ranks[r].update(*data[r][step])
    saved = ranks[0].state_dict((0, 1))
    saved["ranks"].append(ranks[1].state_dict((0, 1))["ranks"][0])  # as the all_gather of 2 ranks gives it
    one = PrequentialState(window=3, bins=1 << 12)
    one.load_state_dict(saved, (0, 1))
    got = one.compute(torch.device("cpu"))
    everything = [b for r in range(2) for b in data[r]]
    check(got, reference(torch.cat([b[0] for b in everything]), torch.cat([b[1] for b in everything]), 1 << 12))
    recent = [b for r in range(2) for b in data[r][3:]]
    check(got, reference(torch.cat([b[0] for b in recent]), torch.cat([b[1] for b in recent]), 1 << 12), "window_")
    other = PrequentialState(window=3, bins=1 << 12)
    other.load_state_dict(saved, (1, 3))  # rank 1 of 3 starts from zero: rank 0 holds the sums
    assert other.compute(torch.device("cpu"))["samples"] == 0 and other.batches == 6


class Recorder(pl.Callback):
    def __init__(self, prequential: PrequentialEvaluation) -> None:
        self.prequential, self.logits, self.labels, self.values = prequential, [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logits.append(outputs["logits"].clone())
        self.labels.append(outputs["labels"].clone())
        self.values.append(dict(self.prequential.last))


@pytest.mark.parametrize("model_class", [DLRMModule, DCNModule, DeepFMModule])
def test_models_without_dense_features_train_prequentially_on_one_process(model_class, single_process_env, tmp_path):
    schema = StreamSchema(
        sparse=[
            SparseColumn("cat_0", 200, "none"),
            SparseColumn("cat_1", 50, "none"),
            SparseColumn("cat_2", 20, "modulo"),
        ]
    )
    data = StreamDataModule(SyntheticSource([200, 50, 20], drift_period_records=128, chunk_size=64), schema, batch_size=32,
                            max_records=320, val_source=SyntheticSource([200, 50, 20], seed=1), val_max_records=64)  # fmt: skip
    assert data.num_dense_features == 0
    kwargs = (
        dict(dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]) if model_class is not DeepFMModule else {}
    )
    model = model_class(num_embeddings_per_feature=data.num_embeddings_per_feature, num_dense_features=0, embedding_dim=8,
                        feature_names=data.feature_names, learning_rate=0.01, **kwargs)  # fmt: skip
    vector = next(m for m in model.modules() if isinstance(m, LearnedDenseVector)).vector
    before = vector.detach().clone()
    prequential = PrequentialEvaluation(window=4, bins=1 << 12, every_n_steps=1)
    recorder = Recorder(prequential)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[prequential, recorder], default_root_dir=tmp_path,
        strategy=lightning_sparse.SparseStrategy(optimizer=SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.1)),
    )  # fmt: skip
    trainer.fit(model, data)
    assert len(recorder.values) == 10  # max_records=320 in batches of 32
    for step in range(1, 11):
        check(
            recorder.values[step - 1],
            reference(torch.cat(recorder.logits[:step]), torch.cat(recorder.labels[:step]), 1 << 12),
        )
        first = max(0, step - 4)
        window = reference(torch.cat(recorder.logits[first:step]), torch.cat(recorder.labels[first:step]), 1 << 12)
        check(recorder.values[step - 1], window, "window_")
    assert trainer.callback_metrics["prequential/auc"].item() == pytest.approx(recorder.values[-1]["auc"], abs=1e-6)
    assert 0 < trainer.callback_metrics["val/auc"].item() < 1  # the validation stream ran at the end of the epoch
    assert not torch.equal(vector.detach(), before)  # the stand-in for the bottom MLP learns


def test_models_refuse_dense_features_they_were_not_built_for_and_prequential_needs_the_logits(
    single_process_env, tmp_path
):
    model = DLRMModule(
        num_embeddings_per_feature=[10, 10], num_dense_features=0, embedding_dim=8, dense_arch_layer_sizes=[8]
    )
    with pytest.raises(
        ValueError, match=r"built with num_dense_features=0, but the batch has dense_features of shape \(4, 3\)"
    ):
        model.dlrm.dense_arch(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="num_dense_features must be an int >= 0, got -1"):
        DeepFMModule(num_embeddings_per_feature=[10], num_dense_features=-1)

    class LossOnly(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[PrequentialEvaluation()], default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(TypeError, match="training_step gave the keys \\['loss'\\]; return \\{'loss': loss, 'logits'"):
        trainer.fit(LossOnly())


def test_the_training_curves_have_a_prequential_panel(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,prequential/auc,prequential/window_ne\n0,9,0.61,0.98\n0,19,0.65,0.95\n")
    assert plot_training_curves(path, tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ((title, metrics),) = [(t, m) for t, m in PANELS if any(key.startswith("prequential/") for key, _, _ in m)]
    assert [key for key, _, _ in metrics] == [
        "prequential/auc",
        "prequential/window_auc",
        "prequential/ne",
        "prequential/window_ne",
    ]
