"""The communication report: payload rules per collective, report and fit-summary formats, the planner hint's
closed forms, and (called from tests/test_row_wise.py, which runs the 2-process job) the bytes a row_wise step
sends, by channel, equal to the closed-form count of its batches."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import WORKERS

from lightning_sparse.callbacks import _comm_rows
from lightning_sparse.distributed.comm import Channel, CommunicationReport, Traffic, payload
from lightning_sparse.distributed.comm_hint import BatchStats, cheapest, sharding_hint

sys.path.insert(0, str(WORKERS))
import sparse_kinds


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def test_payload_counts_what_leaves_and_reaches_this_rank():
    # all_to_all with uneven splits: the chunk a rank keeps is not traffic
    bound = {"output": _t(5, 2), "input": _t(7, 2), "output_split_sizes": [3, 2], "input_split_sizes": [4, 3]}
    assert payload("all_to_all_single", bound, rank=1, world=2) == (4 * 2 * 4, 3 * 2 * 4)
    assert payload("all_to_all_single", {"output": _t(6), "input": _t(6)}, rank=0, world=3) == (4 * 4, 4 * 4)
    assert payload("reduce_scatter_tensor", {"output": _t(8, 16), "input": _t(16, 16)}, 0, 2) == (512, 512)
    assert payload("all_gather_into_tensor", {"output_tensor": _t(24, 4), "input_tensor": _t(8, 4)}, 0, 3) == (256, 256)
    assert payload("reduce_scatter", {"output": _t(2), "input_list": [_t(2), _t(2), _t(2)]}, 2, 3) == (16, 16)
    assert payload("all_gather", {"tensor_list": [_t(3), _t(3)], "tensor": _t(3)}, 0, 2) == (12, 12)
    assert payload("all_reduce", {"tensor": _t(17)}, 0, 2) == (68, 68)  # 2 (W - 1) / W of the buffer
    assert payload("broadcast", {"tensor": _t(4), "src": 0}, 0, 3) == (32, 0)
    assert payload("broadcast", {"tensor": _t(4), "src": 0}, 1, 3) == (0, 16)


def test_fit_summary_prints_the_communication_rows():
    metrics = {"comm/total/sent_bytes": 3072.0, "comm/total/received_bytes": 2048.0,
               "comm/row_wise/t_a/sent_bytes": 1024.0, "comm/row_wise/t_a/received_bytes": 1024.0}  # fmt: skip
    assert _comm_rows(metrics) == [
        "comm total                sent 3.0 KiB, received 2.0 KiB",
        "comm row_wise t_a         sent 1.0 KiB, received 1.0 KiB",
    ]


def test_report_format_and_metrics():
    channel = Channel("row_wise", "t_a+t_b", "output_dist")
    report = CommunicationReport(
        steps=2, total={channel: Traffic(4096, 2048, 4)}, last_step={channel: Traffic(2048, 1024, 2)}
    )
    assert report.format().splitlines()[1].split() == ["row_wise/t_a+t_b/output_dist", "2.00", "1.00", "2.0"]
    assert report.as_metrics() == {"comm/row_wise/t_a+t_b/sent_bytes": 2048, "comm/row_wise/t_a+t_b/received_bytes": 1024,
                                   "comm/total/sent_bytes": 2048, "comm/total/received_bytes": 1024}  # fmt: skip


def test_sharding_hint_closed_forms_on_two_ranks():
    """B = 4 samples and 8 ids per rank per step, 10 rows (blocks of 5), dim 6; rank 0's ids all in rank 1's block."""
    stats = [BatchStats(1, {"t": 4}, {"t": 8}, {"t": 8}), BatchStats(1, {"t": 4}, {"t": 8}, {"t": 0})]
    hint = sharding_hint(stats, {"t": (10, 6)})["t"]
    assert hint["table_wise"] == 8 * (4 + 8) + 8 * 4 * 6  # the non-owner's lengths and ids, pooled rows both ways
    assert hint["column_wise"] == 2 * (8 * (4 + 8) + 8 * 4 * 3)
    assert hint["row_wise"] == 2 * 8 * 4 + 8 * 8 + 2 * 4 * 6 * 8
    assert hint["data_parallel"] == 8 * 10 * 7
    assert cheapest({"t": hint}) == {"t": "table_wise"}
    assert cheapest({"t": hint}, allowed=("row_wise", "data_parallel")) == {"t": "row_wise"}
    kjt = sparse_kinds.batch_at("fused", 0)[0]
    counted = BatchStats()
    counted.add(kjt, {"f_t_sgd": "t_sgd"}, {"t_sgd": 30}, rank=1, world=2)
    ids = kjt["f_t_sgd"].values()
    assert (counted.samples, counted.ids, counted.outside_block) == (
        {"t_sgd": 8},
        {"t_sgd": ids.numel()},
        {"t_sgd": int((ids < 15).sum())},
    )


def _row_wise_input_bytes(rank: int, position: int) -> tuple[int, int]:
    """Closed form of TorchRec's row-wise input dist for rank ``rank`` of 2 at batch ``position``: 3 int64 split
    counts and the int64 lengths of every (feature, sample) to the other rank, and the ids in its row block."""
    specs = sparse_kinds.tables("fused")
    ids_to_other = []
    for r in (0, 1):
        kjt, _ = sparse_kinds.batch_at("fused", position + r)
        n = 0
        for name, rows, _ in specs:
            block = (rows + 1) // 2
            ids = kjt[f"f_{name}"].values()
            n += int((ids >= block).sum()) if r == 0 else int((ids < block).sum())
        ids_to_other.append(n)
    fixed = 3 * 8 + len(specs) * sparse_kinds.BATCH * 8
    return fixed + 8 * ids_to_other[rank], fixed + 8 * ids_to_other[1 - rank]


def assert_row_wise_step_bytes(result: dict, steps: int) -> None:
    """The bytes a row_wise step of the ``sparse_kinds.py`` worker (``--count-communication``) sent, by channel,
    against the closed form of its batches; ``tests/test_row_wise.py`` runs the worker (and checks that
    training with the counter on matches the unsharded reference)."""
    group = "row_wise/" + "+".join(sorted(name for name, _, _ in sparse_kinds.tables("fused")))
    dims = sum(dim for _, _, dim in sparse_kinds.tables("fused"))
    pooled = sparse_kinds.BATCH * dims * 4  # one float32 partial sum per (sample, feature) of the other rank
    dense = 2 * (2 - 1) // 2 * (dims + 1) * 4  # the head Linear(dims, 1), all-reduced by DDP
    for rank, report in enumerate(result["comm"]):
        assert report["steps"] == steps
        per_step = report["per_step"]
        assert set(per_step) == {
            f"{group}/input_dist",
            f"{group}/output_dist",
            f"{group}/output_dist_backward",
            "dense/ddp/grad_allreduce",
        }
        assert per_step[f"{group}/output_dist"] == [pooled, pooled]  # reduce_scatter of the partial sums
        assert per_step[f"{group}/output_dist_backward"] == [pooled, pooled]  # all_gather of their gradients
        assert per_step["dense/ddp/grad_allreduce"] == [dense, dense]
        positions = [(2 * s) % sparse_kinds.BATCHES_PER_EPOCH for s in range(steps)]
        sent = [_row_wise_input_bytes(rank, p)[0] for p in positions]
        received = [_row_wise_input_bytes(rank, p)[1] for p in positions]
        assert per_step[f"{group}/input_dist"] == [sum(sent) / steps, sum(received) / steps]
    first = _row_wise_input_bytes(0, 0)[0] + _row_wise_input_bytes(1, 0)[0]
    # logged on the first step (then every log_every_n_steps), summed over both ranks
    assert result["metrics"][f"comm/{group}/sent_bytes"] == first + 2 * 2 * pooled
    assert result["metrics"]["comm/total/sent_bytes"] == result["metrics"]["comm/total/received_bytes"]
    # the planner hint's row_wise estimate is the measured group traffic less the split counts (3 int64 per pair)
    hint = sharding_hint(
        [BatchStats(**r["batch_stats"]) for r in result["comm"]],
        {n: (rows, d) for n, rows, d in sparse_kinds.tables("fused")},
    )
    measured = sum(sum(v[0] for k, v in r["per_step"].items() if k.startswith(group)) for r in result["comm"])
    assert sum(h["row_wise"] for h in hint.values()) == pytest.approx(measured - 2 * 3 * 8)
