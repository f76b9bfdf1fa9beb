"""``lightning-sparse`` with bad input: ids past a static table on 2 processes (an error, or dropped and
counted), config errors found before any process starts, and runs that never share a directory."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest
import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from test_cli import EXAMPLES, _cli_command, _cli_env, _main_exit, read_csv_metrics, run_cli_process

from lightning_sparse.cli import SparseArgumentParser, SparseCLI
from lightning_sparse.data import SyntheticClickDataModule
from lightning_sparse.loggers import reserve_version
from lightning_sparse.models import ClickModule

DLRM = str(EXAMPLES / "dlrm.yaml")
# The synthetic stream draws cat_0's ids from 10^6 values while its static table has 100000 rows.
WIDE_IDS = ["--data.init_args.id_space_per_feature", "[1000000, 50000, 20000, 10000, 5000, 1000, 500, 100]"]
SHORT = [
    "--data.init_args.num_train_batches",
    "8",
    "--data.init_args.batch_size",
    "256",
    "--data.init_args.num_val_batches",
    "2",
    "--trainer.val_check_interval",
    "1.0",
    "--trainer.log_every_n_steps",
    "1",
]


@pytest.fixture
def offline_in(tmp_path, monkeypatch):
    """In-process CLI runs in ``tmp_path``, W&B offline, no versions inherited from another run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("LIGHTNING_SPARSE_LOG_VERSIONS", raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------- bad ids, 2 processes
def test_ids_past_a_static_table_stop_a_two_process_run_naming_table_feature_and_value(tmp_path):
    proc = run_cli_process("fit", "--config", DLRM, *SHORT, *WIDE_IDS, cwd=tmp_path)
    assert proc.returncode != 0
    assert re.search(
        r"feature 'cat_0' of table 't_cat_0' \(100000 rows\): \d+ id\(s\) outside \[0, 100000\), e\.g\. \d{6}",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert "bad_ids='drop'" in proc.stderr


def test_drop_policy_counts_dropped_ids_over_both_processes(tmp_path):
    train_only = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    out = run_cli_process(
        "fit",
        "--config",
        DLRM,
        *SHORT,
        *WIDE_IDS,
        *train_only,
        "--trainer.strategy.init_args.bad_ids",
        "drop",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_csv_metrics(tmp_path / "outputs" / "dlrm" / "csv" / "version_0" / "metrics.csv")
    # The same 8 batches, generated here: every cat_0 id past the table's 100000 rows is dropped once.
    sizes = [100000, 50000, 20000, 10000, 5000, 1000, 500, 100]
    data = SyntheticClickDataModule(
        sizes, id_space_per_feature=[1000000, *sizes[1:]], batch_size=256, num_train_batches=8
    )
    expected = sum(int((data.train_set[i].sparse_features["cat_0"].values() >= 100000).sum()) for i in range(8))
    assert expected > 0 and metrics["input/dropped_ids"][-1] == expected  # both ranks' counts, summed
    assert metrics["input/dropped_ids/t_cat_0"] == metrics["input/dropped_ids"]
    assert set(metrics["input/dropped_ids/t_cat_1"]) == {0.0}


# ------------------------------------------------------------------------------ config errors, no start-up
BEFORE_START_UP = {
    "unknown table": (
        ["--trainer.strategy.init_args.tables", "{t_typo: {sharding: table_wise}}"],
        "names unknown table(s) ['t_typo']; the model's tables are ['t_cat_0', 't_cat_1'",
    ),
    "dynamic capacity": (
        ["--trainer.strategy.init_args.tables", "{t_cat_2: {dynamic: {capacity: 5}}}"],
        "Table 't_cat_2': dynamic.capacity=5 must equal the table's rows (num_embeddings=20000)",
    ),
    "adam on column_wise": (
        ["--trainer.strategy.init_args.tables", "{t_cat_0: {sharding: column_wise, optimizer: {kind: adam}}}"],
        "Table 't_cat_0': fbgemm has no fused 'adam' kernel on cpu, so it runs in lightning_sparse kernels, which need whole rows on a rank",
    ),
}


@pytest.mark.parametrize("case", sorted(BEFORE_START_UP))
def test_config_errors_that_need_the_model_stop_before_start_up(case, offline_in, capsys):
    overrides, expected = BEFORE_START_UP[case]
    started = time.perf_counter()
    code, out, err = _main_exit(["fit", "--config", DLRM, *overrides], capsys)
    assert code == 2
    assert err.startswith("error: invalid configuration:\n  - ") and expected in err, err[-2000:]
    assert "Initializing distributed" not in out + err  # no process group, no second process
    assert time.perf_counter() - started < 60
    assert not list(offline_in.glob("outputs/dlrm/csv/version_*"))  # the reserved run directory is released


@pytest.mark.parametrize(
    "override, cause",
    [
        (["--trainer.strategy.init_args.optimizer.lr", "-1"], "SparseOptimizerConfig.lr must be >= 0, got -1.0"),
        (["--data.init_args.batch_size", "0"], "num_batches and batch_size must be >= 1, got 240 and 0"),
        (
            ["--trainer.strategy.init_args.bad_ids", "ignore"],
            "BadIdPolicy='ignore' is not valid; allowed values: 'error', 'drop'",
        ),
    ],
)
def test_constructor_errors_lead_with_their_cause_not_the_union_report(override, cause, offline_in, capsys):
    code, _, err = _main_exit(["fit", "--config", DLRM, *override], capsys)
    assert code == 2
    lines = err.splitlines()
    first = lines.index("error: invalid configuration:")
    assert lines[first + 1] == f"  - {cause}", err[-2000:]


# ----------------------------------------------------------------------------------------- runs do not mix
def test_runs_reserving_versions_at_once_get_different_ones(tmp_path):
    (tmp_path / "csv" / "version_3").mkdir(parents=True)
    start = threading.Barrier(8)
    versions: list[int] = []

    def reserve() -> None:
        start.wait()
        versions.append(reserve_version(str(tmp_path / "csv")))

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(4, 12))


def test_two_runs_started_together_in_one_directory_keep_apart(tmp_path):
    """Both runs start at once in the same directory: each has its own version directory, holding its own
    config.yaml (its seed), metrics and checkpoint."""
    procs = [
        subprocess.Popen(
            [
                *_cli_command(),
                "fit",
                "--config",
                DLRM,
                *SHORT,
                "--trainer.devices",
                "1",
                "--seed_everything",
                str(seed),
                "--trainer.logger",
                "[{class_path: lightning_sparse.loggers.CSVLogger, init_args: {name: csv}}]",
            ],
            cwd=tmp_path,
            env=_cli_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "outputs" / "dlrm" / "csv").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    seeds = {yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] for run in runs}
    assert seeds == {1, 2}
    for run in runs:
        assert len(list((run / "checkpoints").iterdir())) == 1 and (run / "metrics.csv").exists()


def test_a_run_whose_config_would_land_on_another_runs_is_refused_before_start_up(offline_in, capsys):
    """A fixed directory (here W&B's, the first logger) already holds a run's config.yaml."""
    occupied = offline_in / "outputs" / "dlrm"
    occupied.mkdir(parents=True)
    (occupied / "config.yaml").write_text("trainer: {}\n")
    wandb_first = "[{class_path: lightning_sparse.loggers.WandbLogger, init_args: {project: p}}]"
    code, _, err = _main_exit(["fit", "--config", DLRM, "--trainer.logger", wandb_first], capsys)
    assert code == 2
    assert f"{occupied / 'config.yaml'} belongs to another run" in err and "put a CSVLogger first" in err
    assert (occupied / "config.yaml").read_text() == "trainer: {}\n"


def test_processes_started_by_the_launcher_take_its_versions_and_create_none(offline_in, monkeypatch):
    """Lightning re-runs the command line for rank 1: it must use rank 0's version, not reserve another."""
    root = offline_in / "outputs" / "dlrm" / "csv"
    monkeypatch.setenv("LIGHTNING_SPARSE_LOG_VERSIONS", json.dumps({str(root): 7}))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    cli = SparseCLI(
        ClickModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=SparseArgumentParser,
        run=False,
        args=["--config", DLRM],
    )
    assert cli.trainer.loggers[0].version == 7
    assert not root.exists()
