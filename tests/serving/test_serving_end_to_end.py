"""Issue 13 acceptance on a real 2-process run: DeltaExport during training, every version replayed into
LMDB and Redis equals the live tables exactly, tombstones, touched ids, the predictor's scores, serve-apply."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import read_checkpoint, run_worker
from replay import STATIC, checkpoint_tensors, live_tables, max_difference

from lightning_sparse.data.synthetic import SyntheticClickStream
from lightning_sparse.serving import Predictor, apply_pending, load_version, open_store
from lightning_sparse.serving.cli import main as serve_apply
from lightning_sparse.serving.format import read_current

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """100 steps on 2 processes (200 batches of 8), an export every 10 steps: versions 1 (full) .. 10."""
    tmp = tmp_path_factory.mktemp("serving_run")
    exports, ckpt = tmp / "exports", tmp / "final.ckpt"
    result = run_worker(
        "serving_fit.py", "--devices", 2, "--batches", 200, "--every-n-steps", 10,
        "--exports", exports, "--ckpt-out", ckpt, result=tmp / "result.json",
    )  # fmt: skip
    return {"exports": exports, "result": result, "tensors": checkpoint_tensors(ckpt, read_checkpoint)}


def test_replayed_versions_equal_live_tables_and_dead_ids_are_tombstoned(trained, store_spec):
    result, exports = trained["result"], trained["exports"]
    assert result["plan"] == {
        "t_cat_0": "table_wise",
        "t_cat_1": "column_wise",
        "t_cat_2": "table_wise",
        "t_cat_3": "data_parallel",
    }
    assert result["exported_steps"] == list(range(10, 101, 10)) and result["version"] == 10
    with open_store(store_spec) as store:
        assert apply_pending(store, exports) == list(range(1, 11))
        live = live_tables(trained["tensors"])
        assert max_difference(store, live) == 0.0
        # every id t_cat_0 ever exported and no longer live: its last record is a tombstone, and the store lacks it
        last_record: dict[int, bool] = {}
        for version in range(1, 11):
            change = load_version(exports, version).updates["t_cat_0"]
            last_record.update({i: False for i in change.ids.tolist()})
            last_record.update({i: True for i in change.deletes.tolist()})
        dead = np.array(sorted(set(last_record) - set(live["t_cat_0"][0].tolist())), np.int64)
        counters = result["dynamic_metrics"]["t_cat_0"]
        assert counters["evicted"] > 0 and counters["expired"] > 0 and len(dead) > 20
        assert all(last_record[i] for i in dead.tolist())
        assert not store.lookup({"t_cat_0": dead}).rows["t_cat_0"][1].any()


def test_exported_rows_per_version_are_the_ids_touched(trained):
    result, exports = trained["result"], trained["exports"]
    touched: dict[int, dict[str, set]] = {}
    for rank in result["ranks"]:
        for step, features in rank["touched"].items():
            for feature, ids in features.items():
                touched.setdefault(int(step), {}).setdefault(f"t_{feature}", set()).update(ids)
    first = load_version(exports, 1)
    assert first.full and [len(first.updates[t].ids) for t in STATIC] == [30, 20, 10]
    steps = result["exported_steps"]
    for version in range(2, 11):
        update = load_version(exports, version)
        assert not update.full
        since = set().union(
            *(touched[s].get("t_cat_0", set()) for s in range(steps[version - 2] + 1, steps[version - 1] + 1))
        )
        for table in STATIC:
            expected = set().union(*(touched[s][table] for s in range(steps[version - 2] + 1, steps[version - 1] + 1)))
            assert set(update.updates[table].ids.tolist()) == expected, (version, table)
        assert set(update.updates["t_cat_0"].ids.tolist()) <= since


def test_predictor_scores_equal_training_eval_scores_and_reload(trained, store_spec):
    result, exports = trained["result"], trained["exports"]
    stream = SyntheticClickStream(split_offset=result["data"]["num_train_batches"] + 1, num_batches=2, **{
        k: v for k, v in result["data"].items() if k in ("batch_size", "zipf_exponent", "drift_period", "seed", "num_dense_features")
    }, num_embeddings_per_feature=result["data"]["id_space_per_feature"])  # fmt: skip
    with open_store(store_spec) as store:
        apply_pending(store, exports, until=4)
        predictor = Predictor(store)
        assert predictor.version == 4
        early = predictor.predict(stream[0])
        apply_pending(store, exports)  # versions 5..10 arrive while the predictor is up
        for rank, share in enumerate(result["ranks"]):
            scores = predictor.predict(stream[rank])
            assert predictor.version == 10
            expected = torch.tensor(share["predictions"][0])
            assert (scores - expected).abs().max().item() <= 1e-6
        assert not torch.equal(early, predictor.predict(stream[0]))


def test_serve_apply_follows_the_exports(trained, tmp_path, redis_url, capsys):
    store = f"lmdb:{tmp_path / 's'}"
    args = ["--store", store, "--exports", str(trained["exports"]), "--once"]
    assert serve_apply(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["version"] for line in lines[:-1]] == list(range(1, 11)) and lines[-1] == {"store_version": 10}
    assert all(line["applied_at"] >= line["exported_at"] for line in lines[:-1])
    assert serve_apply(args) == 0  # nothing new: the store stays where it is
    assert json.loads(capsys.readouterr().out) == {"store_version": read_current(trained["exports"])["version"]}
    dead = redis_url.rsplit(":", 1)[0] + ":1"
    assert serve_apply(["--store", dead, "--exports", str(trained["exports"]), "--once"]) == 1
    assert "error: cannot reach the Redis store redis://127.0.0.1:1" in capsys.readouterr().err
