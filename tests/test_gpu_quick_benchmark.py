"""benchmarks/gpu_quick.py, the benchmark of the one-call GPU check, in a tiny CPU configuration: it trains
through SparseStrategy, remaps ids and prints its table, so the GPU session does not find a broken script."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def gpu_quick():
    spec = importlib.util.spec_from_file_location("gpu_quick", REPO / "benchmarks" / "gpu_quick.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_criteo_tables_are_capped(gpu_quick):
    rows = gpu_quick.table_rows(1_000_000)
    assert len(rows) == 26 and max(rows) == 1_000_000 and rows[5] == 3
    assert sum(rows) == 6 * 1_000_000 + sum(r for r in gpu_quick.CRITEO_1TB_ROWS if r < 1_000_000)


def test_smoke_on_cpu(gpu_quick, single_process_env):
    args = argparse.Namespace(
        device="cpu", kind="rowwise_adam", steps=2, warmup=1, batch_size=32, cap=500,
        remap_capacity=1024, remap_batch=4096, remap_steps=2,
    )  # fmt: skip
    trained = gpu_quick.train_one_kind(args)
    assert trained["samples_per_sec"] > 0 and trained["route"] == "our kernels"  # fbgemm has no CPU row-wise Adam
    remap = gpu_quick.run_remap(args)
    assert remap["cpu_ids_per_sec"] > 0 and "cuda_ids_per_sec" not in remap
    table = gpu_quick.summary(args, [trained, {"kind": "adam", "error": "boom"}], remap)
    assert "rowwise_adam" in table and "our kernels" in table and "FAILED" in table and "capped at 500 rows" in table
