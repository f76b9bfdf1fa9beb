"""StreamDataModule and PrequentialEvaluation on 2 processes under SparseStrategy (tests/workers/stream_train.py):

* the stream is dealt to the ranks in order (record g to rank g mod 2), malformed lines skipped;
* the prequential numbers are those of torchmetrics' exact AUROC over both ranks' predictions together;
* a run resumed from a mid-epoch checkpoint reads exactly the next records, computes bit-identical logits and
  carries the window and cumulative state on, as if it had never stopped.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from conftest import run_worker
from torchmetrics.functional.classification import binary_auroc

BINS = 1 << 16
RECORDS = 230


def write_stream(directory: Path, kind: str) -> str:
    """RECORDS click records (label, user, item, position) over 3 files; line 7 of the TSV stream is malformed."""
    rng = random.Random(5)
    rows = []
    for g in range(RECORDS):
        user, item = rng.randrange(30), rng.randrange(1000)
        label = int(rng.random() < (0.8 if (user + item) % 3 == 0 else 0.15))
        rows.append((label, f"u{user}", item, g))
    directory.mkdir()
    chunks = [rows[:90], rows[90:170], rows[170:]]
    if kind == "tsv":
        for i, chunk in enumerate(chunks):
            lines = [f"{label}\t{user}\t{item}\t{g}\n" for label, user, item, g in chunk]
            if i == 0:
                lines.insert(6, "1\tu1\tnot-a-number\t-1\n")
            (directory / f"day_{i}.tsv").write_text("".join(lines))
        return str(directory / "day_*.tsv")
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, chunk in enumerate(chunks):
        table = pa.table({name: [r[k] for r in chunk] for k, name in enumerate(["label", "user", "item", "position"])})
        pq.write_table(table, directory / f"day_{i}.parquet", row_group_size=16)
    return str(directory / "day_*.parquet")


def _reference(steps_by_rank: list[list[dict]], upto: int, window: int) -> dict[str, float]:
    """The prequential values after batch ``upto`` (1-based), from the gathered logits with torchmetrics."""

    def metrics(first: int) -> dict[str, float]:
        logits = torch.tensor(
            [x for steps in steps_by_rank for s in steps[first:upto] for x in s["logits"]], dtype=torch.float64
        )
        labels = torch.tensor([x for steps in steps_by_rank for s in steps[first:upto] for x in s["labels"]])
        probs = torch.sigmoid(logits)
        bins = ((logits.clamp(-16, 16) + 16) * (BINS / 32)).floor().clamp(0, BINS - 1)
        quantized = bins / BINS  # in [0, 1): torchmetrics takes them as probabilities
        positive, negative = (
            torch.bincount(bins.long()[labels == 1], minlength=BINS),
            torch.bincount(bins.long()[labels == 0], minlength=BINS),
        )
        tied_share = float((positive * negative).sum()) / max(1, int(positive.sum()) * int(negative.sum()))
        loss = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-12, 1 - 1e-12), labels.double()).item()
        p = labels.double().mean().item()
        return {
            "auc": binary_auroc(quantized, labels.long()).item(), "exact_auc": binary_auroc(probs, labels.long()).item(),
            "tied_share": tied_share, "logloss": loss, "ne": loss / -(p * math.log(p) + (1 - p) * math.log(1 - p)), "samples": float(labels.numel()),
        }  # fmt: skip

    everything, recent = metrics(0), metrics(max(0, upto - window))
    return {**everything, **{f"window_{k}": v for k, v in recent.items()}}


def _check_prequential(steps_by_rank: list[list[dict]], window: int) -> None:
    for upto in range(1, len(steps_by_rank[0]) + 1):
        got = steps_by_rank[0][upto - 1]["prequential"]
        assert all(steps[upto - 1]["prequential"] == got for steps in steps_by_rank), "ranks disagree"
        want = _reference(steps_by_rank, upto, window)
        for key in ("auc", "logloss", "ne", "samples", "window_auc", "window_logloss", "window_ne", "window_samples"):
            # torchmetrics returns the AUC as float32
            assert got[key] == pytest.approx(want[key], abs=1e-6 if key.endswith("auc") else 1e-9), (upto, key)
        # Rounding to bins moves the AUC by at most half the share of positive-negative pairs in one bin.
        assert abs(got["auc"] - want["exact_auc"]) <= 0.5 * want["tied_share"] + 1e-6


def test_two_ranks_read_the_stream_in_order_score_it_exactly_and_resume_mid_epoch(tmp_path):
    kind = "tsv"  # Parquet positions resume the same way: tests/test_stream.py checks them without processes
    pattern = write_stream(tmp_path / "stream", kind)
    straight = run_worker(
        "stream_train.py", "--source", kind, "--paths", pattern, "--max-steps", 8, "--ckpt-dir", tmp_path / "ckpt",
        result=tmp_path / "straight.json",
    )  # fmt: skip
    ranks = straight["ranks"]
    assert straight["global_step"] == 8 and [len(r) for r in ranks] == [8, 8]
    # Rank r trains on the stream's records r, r + 2, ... in order, 8 per batch; the malformed TSV line is
    # record 6 of the stream (rank 0's), so rank 0 skips it and moves on to its next record.
    for rank, steps in enumerate(ranks):
        positions = [p for s in steps for p in s["positions"]]
        mine = [g for g in range(RECORDS + 1) if g % 2 == rank]
        if kind == "tsv":  # the stream's lines: records 0..5, the bad line, then records 6.. shifted by one
            mine = [g if g < 6 else g - 1 for g in mine if g != 6]
        assert positions == mine[: len(positions)]
        assert all(len(s["positions"]) == 8 for s in steps)
    _check_prequential(ranks, window=3)

    checkpoint = tmp_path / "ckpt" / "step=3.ckpt"
    assert checkpoint.is_dir()
    resumed = run_worker(
        "stream_train.py", "--source", kind, "--paths", pattern, "--max-steps", 8, "--ckpt-in", checkpoint,
        result=tmp_path / "resumed.json",
    )  # fmt: skip
    for rank in range(2):
        after = resumed["ranks"][rank]
        assert [s["global_step"] for s in after] == list(range(4, 9))
        assert after == ranks[rank][3:], f"rank {rank}: the resumed run differs from the straight one"
