"""``lightning-sparse`` end to end from YAML: fit on 2 processes then validate from the checkpoint on 1,
Criteo fit then test, bad-config errors, ``--print_config``, offline W&B files and the curve PNG.

Training runs go through the console script in subprocesses (Lightning's popen launcher re-executes
the command line for rank 1); parse-only cases (errors, ``--print_config``) run ``main`` in-process.
"""

from __future__ import annotations

import csv
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, _worker_env

from lightning_sparse.cli import main, summarize_config_error
from lightning_sparse.loggers import default_wandb_to_offline

EXAMPLES = REPO / "examples"
CLI = Path(sys.executable).parent / "lightning-sparse"


def _cli_command() -> list[str]:
    # The installed console script is what users run; fall back to the module when not installed.
    return [str(CLI)] if CLI.exists() else [sys.executable, "-m", "lightning_sparse.cli"]


def _cli_env(cwd: Path) -> dict[str, str]:
    env = _worker_env()
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "LIGHTNING_SPARSE_LOG_VERSIONS"):
        env.pop(key, None)
    env["NETRC"] = str(cwd / "no-netrc")  # no `wandb login` either: the CLI must default to offline
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[key] = str(cwd / "wandb-home")
    return env


def run_cli_process(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Runs ``lightning-sparse ARGS`` in ``cwd`` with no W&B credentials, whatever its exit code."""
    return subprocess.run(
        [*_cli_command(), *args], cwd=cwd, env=_cli_env(cwd), capture_output=True, text=True, timeout=timeout
    )


def run_cli(*args: str, cwd: Path, timeout: int = 240) -> str:
    """Runs ``lightning-sparse ARGS`` in ``cwd`` with no W&B credentials; returns stdout, fails with stderr."""
    proc = run_cli_process(*args, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"lightning-sparse {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc.stdout


def read_csv_metrics(path: Path) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, cell in row.items():
                if cell:
                    series.setdefault(key, []).append(float(cell))
    return series


def read_wandb_records(path: Path):
    """Records of a ``.wandb`` file: a 7-byte ``:W&B`` header, then LevelDB-log chunks in 32 KiB blocks,
    each ``crc32 (4) | length (2) | type (1) | payload``, the payloads being serialized ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero-filled remainder of the last block
            break
        chunks = [payload] if kind in (1, 2) else [*chunks, payload]  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            yield record


def wandb_history_and_summary(run_dir: Path) -> tuple[dict[str, list], dict[str, object]]:
    (log,) = run_dir.glob("run-*.wandb")
    history: dict[str, list] = {}
    summary: dict[str, object] = {}
    for record in read_wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    summary_file = run_dir / "files" / "wandb-summary.json"  # written by online runs and some offline versions
    if summary_file.exists():
        summary.update(json.loads(summary_file.read_text()))
    return history, summary


# ----------------------------------------------------------------------------------- end to end (subprocesses)
def test_fit_two_processes_then_validate_one_process_from_checkpoint(tmp_path):
    config = str(EXAMPLES / "dlrm.yaml")
    small = [
        "--data.init_args.num_train_batches",
        "40",
        "--data.init_args.batch_size",
        "256",
        "--data.init_args.num_val_batches",
        "4",
        "--trainer.val_check_interval",
        "10",
        "--trainer.strategy.init_args.count_communication",
        "true",
    ]
    out = run_cli("fit", "--config", config, *small, cwd=tmp_path)

    run = tmp_path / "outputs" / "dlrm" / "csv" / "version_0"
    metrics = read_csv_metrics(run / "metrics.csv")
    for key in (
        "train/loss",
        "val/loss",
        "val/auc",
        "val/log_loss",
        "val/ne",
        "train/samples_per_sec",
        "memory/embedding_weight_bytes",
        "memory/sparse_optimizer_bytes",
    ):
        assert metrics.get(key), f"{key} missing from metrics.csv: {sorted(metrics)}"
    assert len(metrics["val/auc"]) == 2 and metrics["val/auc"][-1] > 0.7  # the stream is learnable
    assert max(metrics["step"]) == 19  # 40 batches over 2 ranks
    # Summed over ranks, the sharded tables' bytes are counted once each (t_cat_0's column shards add up to
    # the whole table); the replicated data_parallel table t_cat_7 (100 rows) once per rank that holds it.
    sharded_rows = 100_000 + 50_000 + 20_000 + 10_000 + 5_000 + 1_000 + 500
    assert metrics["memory/embedding_weight_bytes"][-1] == (sharded_rows + 2 * 100) * 16 * 4
    png = run / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "fit summary (2 processes" in out and "validation AUC" in out
    # count_communication: bytes per step by channel, logged (summed over ranks) and in the fit summary
    assert metrics["comm/total/sent_bytes"][-1] == metrics["comm/total/received_bytes"][-1] > 0
    assert metrics["comm/column_wise/t_cat_0/sent_bytes"][-1] > 0 and metrics["comm/dense/ddp/sent_bytes"][-1] > 0
    assert "comm total                sent " in out and "comm column_wise t_cat_0  sent " in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["init_args"]["tables"]["t_cat_0"]["sharding"] == "column_wise"

    # W&B ran offline without an account, and its run log holds the same metrics.
    (wandb_run,) = (tmp_path / "outputs" / "dlrm" / "wandb").glob("offline-run-*")
    history, summary = wandb_history_and_summary(wandb_run)
    for key in (
        "train/loss",
        "val/auc",
        "val/log_loss",
        "val/ne",
        "train/samples_per_sec",
        "memory/embedding_weight_bytes",
    ):
        assert history.get(key), f"{key} missing from the W&B history: {sorted(history)}"
    assert history["val/auc"] == pytest.approx(metrics["val/auc"], rel=1e-6)
    assert summary["val/auc"] == pytest.approx(metrics["val/auc"][-1], rel=1e-6)

    # The 2-rank checkpoint (a directory) loads into 1 process and reproduces the last validation exactly.
    (ckpt,) = (run / "checkpoints").iterdir()
    assert ckpt.is_dir()
    csv_only = "[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: outputs/validate, name: csv}}]"
    run_cli(
        "validate",
        "--config",
        config,
        *small,
        "--trainer.devices",
        "1",
        "--trainer.logger",
        csv_only,
        "--ckpt_path",
        str(ckpt),
        cwd=tmp_path,
    )
    validated = read_csv_metrics(tmp_path / "outputs" / "validate" / "csv" / "version_0" / "metrics.csv")
    assert validated["val/auc"][-1] == pytest.approx(metrics["val/auc"][-1], abs=1e-6)
    assert validated["val/ne"][-1] == pytest.approx(metrics["val/ne"][-1], abs=1e-5)


def _criteo_line(rng: random.Random) -> str:
    """A line whose label depends on categorical field C1 (so AUC can exceed 0.5)."""
    hot = rng.randrange(40)
    label = int(rng.random() < (0.85 if hot < 20 else 0.15))
    ints = [str(rng.randrange(100)) if rng.random() > 0.1 else "" for _ in range(13)]
    cats = [f"{hot * 7919:08x}"] + [f"{rng.getrandbits(32):08x}" if rng.random() > 0.1 else "" for _ in range(25)]
    return "\t".join([str(label), *ints, *cats])


def test_criteo_fit_then_test_from_checkpoint_skipping_malformed_lines(tmp_path):
    rng = random.Random(0)
    paths = {}
    for split, n in (("train", 3000), ("test", 600)):
        lines = [_criteo_line(rng) for _ in range(n)]
        lines[5] = "1\t2\t3"  # wrong field count
        lines[50] = lines[50].replace(lines[50].split("\t")[20], "zzzzzzzz")  # not hex
        paths[split] = tmp_path / f"{split}.tsv"
        paths[split].write_text("\n".join(lines) + "\n")
    overrides = [
        "--trainer.devices",
        "1",
        "--trainer.logger",
        "[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: outputs/criteo, name: csv}}]",
        "--data.init_args.train_paths",
        str(paths["train"]),
        "--data.init_args.val_paths",
        "null",
        "--data.init_args.test_paths",
        str(paths["test"]),
        "--data.init_args.batch_size",
        "100",
        "--data.init_args.num_embeddings_per_feature",
        "500",
        "--data.init_args.num_workers",
        "0",
        "--model.init_args.embedding_dim",
        "8",
        "--model.init_args.dense_arch_layer_sizes",
        "[16, 8]",
        "--model.init_args.over_arch_layer_sizes",
        "[16, 1]",
        "--model.init_args.learning_rate",
        "0.01",
        "--trainer.max_epochs",
        "3",
        "--trainer.log_every_n_steps",
        "10",
    ]
    config = str(EXAMPLES / "criteo.yaml")
    run_cli("fit", "--config", config, *overrides, cwd=tmp_path)
    run = tmp_path / "outputs" / "criteo" / "csv" / "version_0"
    assert "train/loss" in read_csv_metrics(run / "metrics.csv")
    assert (run / "training_curves.png").exists()
    (ckpt,) = (run / "checkpoints").iterdir()
    out = run_cli("test", "--config", config, *overrides, "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert "test/auc" in out
    tested = read_csv_metrics(tmp_path / "outputs" / "criteo" / "csv" / "version_1" / "metrics.csv")
    # C1 sets the click rate (best possible AUC 0.85; an untrained model is near 0.5): learned, and loaded for test.
    assert tested["test/auc"][-1] > 0.65


def test_dynamic_example_fits_on_two_processes_and_logs_table_counters(tmp_path):
    config = str(EXAMPLES / "dynamic.yaml")
    run_cli(
        "fit",
        "--config",
        config,
        "--data.init_args.num_train_batches",
        "40",
        "--trainer.val_check_interval",
        "10",
        cwd=tmp_path,
    )
    metrics = read_csv_metrics(tmp_path / "outputs" / "dynamic" / "csv" / "version_0" / "metrics.csv")
    assert metrics["dynamic/t_cat_0/capacity"][-1] == 20000
    assert (
        0
        < metrics["dynamic/t_cat_0/live"][-1]
        == metrics["dynamic/t_cat_0/admitted"][-1]
        - metrics["dynamic/t_cat_0/evicted"][-1]
        - metrics["dynamic/t_cat_0/expired"][-1]
    )
    assert metrics["dynamic/t_cat_0/rejected_admission"][-1] > 0  # min_count: 2 keeps one-off ids out
    lookups = metrics["dynamic/t_cat_0/lookups"][-1]
    assert lookups > 0 and lookups % (2 * 1024) == 0  # whole steps of both ranks' 1024 ids (one per sample)


# ------------------------------------------------------------- examples with the one change a user makes
SMALL = [
    "--data.init_args.num_train_batches",
    "6",
    "--data.init_args.batch_size",
    "128",
    "--data.init_args.num_val_batches",
    "2",
    "--trainer.devices",
    "1",
    "--trainer.log_every_n_steps",
    "2",
]


def test_dlrm_example_with_adam_and_another_root_dir_puts_every_output_there(tmp_path):
    """Two processes as configured; the run is shorter than val_check_interval, which is said, not hidden."""
    proc = run_cli_process(
        "fit",
        "--config",
        str(EXAMPLES / "dlrm.yaml"),
        "--trainer.max_steps",
        "3",
        "--trainer.strategy.init_args.optimizer.kind",
        "adam",
        "--trainer.default_root_dir",
        "elsewhere",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "elsewhere",
        "wandb-home",
    ]  # nothing in outputs/
    run = tmp_path / "elsewhere" / "csv" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["init_args"]["optimizer"]["kind"] == "adam"
    assert saved["trainer"]["logger"][0]["init_args"]["save_dir"] == "elsewhere"
    assert list((tmp_path / "elsewhere" / "wandb").glob("offline-run-*"))
    assert (
        "no validation ran and no checkpoint was written in 3 training steps: val_check_interval=0.25 was never reached"
        in proc.stderr
    )


@pytest.mark.parametrize("example", ["dcn.yaml", "deepfm.yaml"])
def test_dcn_and_deepfm_examples_validate_and_checkpoint_a_small_dataset_with_adam(example, tmp_path):
    run_cli(
        "fit",
        "--config",
        str(EXAMPLES / example),
        *SMALL,
        "--trainer.strategy.init_args.optimizer.kind",
        "adam",
        cwd=tmp_path,
    )
    run = tmp_path / "outputs" / example.removesuffix(".yaml") / "csv" / "version_0"
    assert read_csv_metrics(run / "metrics.csv")["val/auc"]  # 6 batches < the 20 an interval used to need
    assert len(list((run / "checkpoints").iterdir())) == 1


def test_dynamic_example_with_lru_eviction_fits(tmp_path):
    run_cli(
        "fit",
        "--config",
        str(EXAMPLES / "dynamic.yaml"),
        *SMALL,
        "--trainer.max_steps",
        "3",
        "--trainer.strategy.init_args.tables.t_cat_0.dynamic.eviction",
        "lru",
        cwd=tmp_path,
    )
    saved = yaml.safe_load((tmp_path / "outputs" / "dynamic" / "csv" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["init_args"]["tables"]["t_cat_0"]["dynamic"]["eviction"] == "lru"


def test_criteo_example_on_a_small_file_with_adam_survives_a_run_too_short_to_plot(tmp_path):
    rng = random.Random(1)
    path = tmp_path / "small.tsv"
    path.write_text("\n".join(_criteo_line(rng) for _ in range(500)) + "\n")
    proc = run_cli_process(
        "fit",
        "--config",
        str(EXAMPLES / "criteo.yaml"),
        "--trainer.devices",
        "1",
        "--trainer.max_steps",
        "3",
        "--data.init_args.train_paths",
        str(path),
        "--data.init_args.val_paths",
        "null",
        "--data.init_args.batch_size",
        "64",
        "--data.init_args.num_embeddings_per_feature",
        "500",
        "--data.init_args.num_workers",
        "0",
        "--model.init_args.embedding_dim",
        "8",
        "--model.init_args.dense_arch_layer_sizes",
        "[16, 8]",
        "--model.init_args.over_arch_layer_sizes",
        "[16, 1]",
        "--trainer.strategy.init_args.optimizer.kind",
        "adam",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TrainingCurvePlot drew no training_curves.png" in proc.stderr and "log_every_n_steps, now 50" in proc.stderr
    run = tmp_path / "outputs" / "criteo" / "csv" / "version_0"
    assert not (run / "training_curves.png").exists() and len(list((run / "checkpoints").iterdir())) == 1


# -------------------------------------------------------------------------- parsing (in-process, no training)
def _main_exit(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_print_config_is_clean_and_round_trips(tmp_path, capsys, offline):
    code, out, _ = _main_exit(["fit", "--config", str(EXAMPLES / "dlrm.yaml"), "--print_config"], capsys)
    assert code == 0
    for python_repr in ("<", "Namespace(", "object at", "!!python"):
        assert python_repr not in out, f"{python_repr!r} in --print_config output"
    cfg = yaml.safe_load(out)
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_sparse.SparseStrategy"
    args = strategy["init_args"]
    assert args["sharding"] == "table_wise" and args["optimizer"]["kind"] == "rowwise_adagrad"
    assert args["tables"]["t_cat_7"] == {
        "sharding": "data_parallel",
        "optimizer": {**args["tables"]["t_cat_7"]["optimizer"], "kind": "adagrad"},
        "dynamic": None,
        "pretrained": None,
        "cache": None,
    }
    assert set(args) == {
        "sharding",
        "optimizer",
        "tables",
        "static_graph",
        "find_unused_parameters",
        "process_group_backend",
        "timeout",
        "start_method",
        "bad_ids",
        "non_finite",
        "on_signal",
        "signal_checkpoint_path",
        "count_communication",
        "pipeline",
        "auto_sharding_batches",
    }  # no accelerator/devices internals
    assert args["bad_ids"] == "error" and args["non_finite"] == "error"
    # Linked from the data module, so not settable on the model.
    assert "num_embeddings_per_feature" not in cfg["model"]["init_args"]
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    code, again, _ = _main_exit(["fit", "--config", str(printed), "--print_config"], capsys)
    assert code == 0 and again == out


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_config_parses(example, capsys, offline):
    code, out, err = _main_exit(["fit", "--config", str(EXAMPLES / example), "--print_config"], capsys)
    assert code == 0, err
    assert yaml.safe_load(out)["trainer"]["strategy"]["class_path"] == "lightning_sparse.SparseStrategy"


def test_defaults_are_dlrm_on_the_synthetic_stream_under_sparse_strategy(capsys, offline):
    code, out, _ = _main_exit(["fit", "--print_config"], capsys)
    cfg = yaml.safe_load(out)
    assert code == 0
    assert cfg["model"]["class_path"] == "lightning_sparse.models.DLRMModule"
    assert cfg["data"]["class_path"] == "lightning_sparse.data.SyntheticClickDataModule"
    assert cfg["trainer"]["strategy"]["init_args"]["sharding"] == "auto"


def test_short_strategy_name_is_accepted(capsys, offline):
    code, out, _ = _main_exit(["fit", "--trainer.strategy", "sparse", "--print_config"], capsys)
    assert code == 0 and yaml.safe_load(out)["trainer"]["strategy"] == "sparse"


STRATEGY = "trainer:\n  strategy:\n    class_path: lightning_sparse.SparseStrategy\n    init_args:\n"
BAD_CONFIGS = {
    "unknown strategy key": (
        STRATEGY + "      shardng: table_wise\n",
        "SparseStrategy has no option 'shardng'; accepted options: sharding, optimizer, tables",
    ),
    "bad sharding value": (
        STRATEGY + "      sharding: diagonal\n",
        "ShardingType='diagonal' is not valid; allowed values: 'auto', 'table_wise', 'column_wise', 'row_wise'",
    ),
    "unknown table option": (
        STRATEGY + "      tables:\n        t_cat_0: {sharding: column_wise, shard: row_wise}\n",
        "TableConfig has no option 'shard'; accepted options: sharding, optimizer",
    ),
    "bad table sharding value": (
        STRATEGY + "      tables:\n        t_cat_0: {sharding: rows}\n",
        "ShardingType='rows' is not valid; allowed values:",
    ),
    "negative auto_sharding_batches": (
        STRATEGY + "      auto_sharding_batches: -1\n",
        "SparseStrategy.auto_sharding_batches=-1: give an integer >= 0 (0: do not read ahead)",
    ),
    "bad optimizer kind": (
        STRATEGY + "      optimizer: {kind: lion}\n",
        "SparseOptimizerKind='lion' is not valid; allowed values: 'sgd', 'adagrad', 'rowwise_adagrad'",
    ),
    "unknown optimizer field": (
        STRATEGY + "      tables:\n        t_cat_1: {optimizer: {kind: sgd, momentum: 0.9}}\n",
        "SparseOptimizerConfig has no option 'momentum'; accepted options: kind, lr, eps, weight_decay",
    ),
    "bad dynamic eviction policy": (
        STRATEGY + "      tables:\n        t_cat_0: {dynamic: {capacity: 100, eviction: random}}\n",
        "EvictionPolicy='random' is not valid; allowed values: 'lfu', 'lru', 'feature_score'",
    ),
    "unknown dynamic option": (
        STRATEGY + "      tables:\n        t_cat_0: {dynamic: {capacity: 100, ttl: 5}}\n",
        "DynamicTableConfig has no option 'ttl'; accepted options: capacity, admission, expiry",
    ),
    "bad criteo enum": (
        "data:\n  class_path: lightning_sparse.data.criteo.CriteoDataModule\n"
        "  init_args: {train_paths: x.tsv, on_error: ignore}\n",
        "OnError='ignore' is not valid; allowed values: 'skip', 'raise'",
    ),
    "unknown model option": (
        "model:\n  class_path: lightning_sparse.models.DCNModule\n  init_args: {dcn_layers: 2}\n",
        "DCNModule has no option 'dcn_layers'; accepted options:",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_a_clear_error(case, tmp_path, capsys, offline):
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = _main_exit(["fit", "--config", str(path)], capsys)
    assert code == 2
    assert "error: invalid configuration:" in err
    assert expected in err, err[-3000:]


def test_error_summary_ignores_messages_without_known_causes():
    assert summarize_config_error("Parser key \"trainer.max_epochs\": Expected a <class 'int'>") == []


# ------------------------------------------------------------------------------------------ W&B offline default
@pytest.mark.parametrize(
    "env, netrc, expected",
    [
        ({}, None, "offline"),
        ({"WANDB_API_KEY": "k" * 40}, None, "online"),
        ({}, "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n", "online"),
        ({}, "machine example.com\n  login user\n  password x\n", "offline"),
        ({"WANDB_MODE": "disabled"}, None, "disabled"),
    ],
)
def test_wandb_defaults_to_offline_without_credentials(env, netrc, expected, tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    netrc_path = tmp_path / "netrc"
    if netrc is not None:
        netrc_path.write_text(netrc)
        netrc_path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert default_wandb_to_offline() == expected
    assert os.environ.get("WANDB_MODE", "online") == expected


def test_cli_leaves_its_process_group_at_the_end(tmp_path, single_process_env, offline):
    """PyTorch asks trainer processes to destroy their process groups at the end of main(); left to the
    interpreter's teardown, the backend's threads can abort a process that finished its work."""
    main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "dlrm.yaml"),
            "--trainer.devices",
            "1",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "null",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "null",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.init_args.batch_size",
            "64",
        ]
    )
    assert not torch.distributed.is_initialized()
