"""The strategy on CUDA (nccl, fbgemm CUDA kernels, row_wise sharding) and the CUDA hash-table kernels of
dynamic tables, each checked against the same computation on the CPU. Skipped on machines without a GPU.

GPU runs are compared with CPU runs of the same seed and batches (``tests/workers/train.py``): weights,
sparse and dense optimizer state after training agree within :data:`RTOL` of each tensor's scale (another
device reassociates float sums; a wrong update rule or a lost row is off by orders of magnitude more), and
hash-table state agrees exactly. Sharding types the CPU lacks (row_wise, table_row_wise) run table_wise
there: sharding moves rows, not results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_trees_equal, read_checkpoint, run_worker, skewed_ids

from lightning_sparse.dynamic import (
    AdmissionConfig,
    DynamicIdRemapper,
    DynamicTableConfig,
    EvictionPolicy,
    ExpiryConfig,
)
from lightning_sparse.ops import native_op_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_TABLES = [
    "--table-sharding", "t_cat_0=row_wise",
    "--table-sharding", "t_cat_1=table_row_wise",
    "--table-sharding", "t_cat_2=column_wise",
    "--table-sharding", "t_cat_3=table_wise",
]  # fmt: skip
SPARSE_KINDS = ["sgd", "adagrad", "rowwise_adagrad", "decayed_adagrad", "rowwise_adam", "adam"]

#: per tensor, max|gpu - cpu| <= RTOL * max|cpu| + ATOL
RTOL, ATOL = 1e-3, 1e-7
#: fbgemm's fused optimizers name Adam's moments momentum1/momentum2, our kernels exp_avg/exp_avg_sq
STATE_ALIASES = {"momentum1": "exp_avg", "momentum2": "exp_avg_sq"}
#: step counters: kept per table by our kernels, inside the TBE module by fbgemm
COUNTERS = {"step", "iter"}


def _devices() -> int:
    return min(2, torch.cuda.device_count())


def _cpu_twin(args: list[Any]) -> list[Any]:
    """The arguments of the same run on CPU processes: accelerator cpu, GPU-only shardings as table_wise."""
    out = [str(a) for a in args]
    out[out.index("--accelerator") + 1] = "cpu"
    return [a.replace("=table_row_wise", "=table_wise").replace("=row_wise", "=table_wise") for a in out]


def _train_on_gpu_and_cpu(tmp_path: Path, *args: Any) -> tuple[dict, dict]:
    """Trains once on the GPU(s) and once on as many CPU processes; checks their checkpoints agree."""
    gpu_args = ["--accelerator", "gpu", "--devices", _devices(), *args]
    gpu = run_worker("train.py", *gpu_args, "--ckpt-out", tmp_path / "gpu.ckpt", result=tmp_path / "gpu.json")
    cpu = run_worker(
        "train.py", *_cpu_twin(gpu_args), "--ckpt-out", tmp_path / "cpu.ckpt", result=tmp_path / "cpu.json"
    )
    assert_checkpoints_close(tmp_path / "gpu.ckpt", tmp_path / "cpu.ckpt")
    return gpu, cpu


def _assert_close(gpu: Any, cpu: Any, what: str) -> None:
    if not isinstance(cpu, torch.Tensor):
        assert gpu == cpu, f"{what}: {gpu!r} on GPU, {cpu!r} on CPU"
        return
    gpu, cpu = gpu.detach().cpu().double(), cpu.detach().double()
    assert gpu.numel() == cpu.numel(), f"{what}: shape {tuple(gpu.shape)} on GPU, {tuple(cpu.shape)} on CPU"
    error = (gpu.reshape(-1) - cpu.reshape(-1)).abs().max().item() if cpu.numel() else 0.0
    scale = cpu.abs().max().item() if cpu.numel() else 0.0
    assert error <= RTOL * scale + ATOL, f"{what}: GPU and CPU differ by {error:.3g} (scale {scale:.3g}, rtol {RTOL})"


def _sparse_state(tensors: dict[str, Any]) -> dict[tuple[str, str], torch.Tensor]:
    """Sparse optimizer state by (table, state name), fused and native names made one."""
    out = {}
    for key, value in tensors.items():
        if key.startswith("sparse_optimizer.state."):
            table, name = key.split(".")[-2:]
            if name not in COUNTERS:
                out[(table, STATE_ALIASES.get(name, name))] = value
    return out


def assert_checkpoints_close(gpu_path: Path, cpu_path: Path) -> None:
    gpu_tensors, gpu_state = read_checkpoint(gpu_path)
    cpu_tensors, cpu_state = read_checkpoint(cpu_path)
    model = sorted(k for k in cpu_tensors if k.startswith("model."))
    assert model == sorted(k for k in gpu_tensors if k.startswith("model.")), "different model parameters"
    for key in model:
        _assert_close(gpu_tensors[key], cpu_tensors[key], key)

    # Sparse optimizer state: every table with state on the CPU has some on the GPU, and they agree.
    gpu_sparse, cpu_sparse = _sparse_state(gpu_tensors), _sparse_state(cpu_tensors)
    cpu_tables = {table for table, _ in cpu_sparse}
    compared = {key[0] for key in cpu_sparse.keys() & gpu_sparse.keys()}
    assert compared == cpu_tables, (
        f"optimizer state of {sorted(cpu_tables - compared)} not comparable: {sorted(gpu_sparse)} vs {sorted(cpu_sparse)}"
    )
    for key in cpu_sparse.keys() & gpu_sparse.keys():
        _assert_close(gpu_sparse[key], cpu_sparse[key], f"sparse optimizer state {key}")

    # Hash tables of dynamic tables: the same admissions, evictions and slots (wall-clock stamps aside).
    hashes = sorted(k for k in cpu_tensors if k.startswith("dynamic_tables.") and not k.endswith("slot_last_time"))
    assert hashes == sorted(
        k for k in gpu_tensors if k.startswith("dynamic_tables.") and not k.endswith("slot_last_time")
    )
    for key in hashes:
        assert torch.equal(gpu_tensors[key].cpu(), cpu_tensors[key]), key

    # Dense optimizer (Adam over the MLPs) and training progress.
    assert gpu_state["global_step"] == cpu_state["global_step"]
    for i, (gpu_opt, cpu_opt) in enumerate(zip(gpu_state["optimizer_states"], cpu_state["optimizer_states"])):
        assert gpu_opt["state"].keys() == cpu_opt["state"].keys()
        for p, cpu_param_state in cpu_opt["state"].items():
            for name, value in cpu_param_state.items():
                _assert_close(gpu_opt["state"][p][name], value, f"dense optimizer {i} param {p} {name}")


def test_gpu_sharding_types_train_with_fused_cuda_kernels_like_the_cpu(tmp_path):
    gpu, cpu = _train_on_gpu_and_cpu(tmp_path, *GPU_TABLES)
    assert {kernel for _, kernel in gpu["plan"].values()} <= {"fused", "fused_uvm", "fused_uvm_caching"}
    assert gpu["plan"]["t_cat_0"][0] == "row_wise" and cpu["plan"]["t_cat_0"][0] == "table_wise"
    assert 0.0 < gpu["metrics"]["val/loss"] < 1.0
    assert gpu["metrics"]["val/loss"] == pytest.approx(cpu["metrics"]["val/loss"], rel=RTOL)


def test_gpu_exact_resume(tmp_path):
    straight, resumed, on_cpu = tmp_path / "straight", tmp_path / "resumed", tmp_path / "cpu"
    common = ["--accelerator", "gpu", "--devices", _devices(), *GPU_TABLES, "--max-epochs", 2]
    run_worker("train.py", *common, "--ckpt-dir", straight, result=tmp_path / "a.json")
    run_worker(
        "train.py", *common, "--ckpt-dir", resumed, "--ckpt-in", straight / "epoch=0.ckpt", result=tmp_path / "b.json"
    )
    tensors_a, state_a = read_checkpoint(straight / "epoch=1.ckpt")
    tensors_b, state_b = read_checkpoint(resumed / "epoch=1.ckpt")
    assert_trees_equal(tensors_a, tensors_b, "model and sparse optimizer")
    assert_trees_equal(state_a["optimizer_states"], state_b["optimizer_states"], "dense optimizer")
    run_worker("train.py", *_cpu_twin(common), "--ckpt-dir", on_cpu, result=tmp_path / "c.json")
    assert_checkpoints_close(straight / "epoch=1.ckpt", on_cpu / "epoch=1.ckpt")


def test_gpu_row_wise_dynamic_table_partitions_resume_exactly(tmp_path):
    """A row_wise dynamic table: one hash partition per rank, each lending rows of its own block."""
    straight, resumed, on_cpu = tmp_path / "straight", tmp_path / "resumed", tmp_path / "cpu"
    common = [
        "--accelerator",
        "gpu",
        "--devices",
        _devices(),
        "--table-sharding",
        "t_cat_3=row_wise",
        "--dynamic-capacity",
        128,
        "--max-epochs",
        2,
    ]
    result = run_worker("train.py", *common, "--ckpt-dir", straight, result=tmp_path / "a.json")
    n = _devices()
    held = [
        sorted({k.split(".")[2] for k in keys if k.startswith("partitions.")})
        for keys in result["hash_state_keys_per_rank"]
    ]
    assert held == [[f"{rank}_of_{n}"] for rank in range(n)]
    assert result["dynamic_metrics"]["t_cat_3"]["evicted"] > 0
    run_worker(
        "train.py", *common, "--ckpt-dir", resumed, "--ckpt-in", straight / "epoch=0.ckpt", result=tmp_path / "b.json"
    )
    tensors_a, _ = read_checkpoint(straight / "epoch=1.ckpt")
    tensors_b, _ = read_checkpoint(resumed / "epoch=1.ckpt")
    for tensors in (tensors_a, tensors_b):
        for key in [k for k in tensors if k.endswith("slot_last_time")]:
            tensors.pop(key)  # wall-clock stamps differ between runs
    assert_trees_equal(tensors_a, tensors_b, "weights, sparse optimizer state and hash partitions")
    if n == 1:  # one partition either way; on several ranks a row_wise table has one per rank, table_wise one
        cpu = run_worker("train.py", *_cpu_twin(common), "--ckpt-dir", on_cpu, result=tmp_path / "c.json")
        assert cpu["dynamic_metrics"] == result["dynamic_metrics"]
        assert_checkpoints_close(straight / "epoch=1.ckpt", on_cpu / "epoch=1.ckpt")


@pytest.mark.parametrize("kind", SPARSE_KINDS)
def test_gpu_sparse_optimizer_kinds_match_the_cpu(tmp_path, kind):
    """Every kind, fused by fbgemm or run by our kernels, on either device: the same rows after training."""
    gpu, _ = _train_on_gpu_and_cpu(tmp_path, "--sharding", "table_wise", "--optimizer", kind)
    assert gpu["metrics"]["val/loss"] < 1.0


def test_nccl_collectives_take_tensors_on_the_gpu(tmp_path):
    """nccl refuses CPU tensors: all_reduce_bytes built one on the CPU before collective_device."""
    result = run_worker("nccl_collectives.py", tmp_path / "store", result=tmp_path / "r.json")
    assert result == {"collective_device": "cuda:0", "all_reduce_bytes": 12345}


# --- dynamic tables: CUDA kernels (cuda_ops/hash_table.cu) against the CPU twin ------------------------

needs_cuda_kernels = pytest.mark.skipif(
    native_op_for("hash_remap", torch.device("cuda")) is None, reason="lightning_sparse._C built without CUDA kernels"
)


def _dynamic_config(policy: EvictionPolicy, capacity: int) -> DynamicTableConfig:
    return DynamicTableConfig(
        capacity=capacity,
        eviction=policy,
        score_decay=0.8,
        admission=AdmissionConfig(min_count=1, probability=0.9, seed=3, sketch_halve_every=2 * capacity),
        expiry=ExpiryConfig(ttl_steps=2, ttl_seconds=1.75),
    )


def _drive_dynamic(remapper: DynamicIdRemapper, batches: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    outputs = []
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        result = remapper.remap(ids, step, now=0.5 * step)
        assert result.slots.device == ids.device and result.slots.shape == ids.shape
        lookup = remapper.lookup(ids.reshape(-1)[:500])
        outputs += [result.slots.cpu(), result.assigned.cpu(), lookup.cpu()]
        if step % 2 == 1:
            outputs.append(remapper.expire(step, now=0.5 * step).cpu())
    return outputs


def _assert_same_table(a: DynamicIdRemapper, b: DynamicIdRemapper) -> None:
    names = a.tensors()._fields + ("decay_powers",)
    for name, x, y in zip(names, (*a.tensors(), a.decay_powers), (*b.tensors(), b.decay_powers)):
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), name
    assert a.metrics() == b.metrics()


def _twin_and_cuda(config, batches, monkeypatch, row_offset=0):
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")
    twin = DynamicIdRemapper(config, row_offset=row_offset)
    out_twin = _drive_dynamic(twin, batches, "cpu")
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "1")
    gpu = DynamicIdRemapper(config, row_offset=row_offset).to("cuda")
    out_gpu = _drive_dynamic(gpu, batches, "cuda")
    return twin, out_twin, gpu, out_gpu


@needs_cuda_kernels
@pytest.mark.parametrize("policy", list(EvictionPolicy))
@pytest.mark.parametrize("capacity, batch", [(600, 1_000), (20_000, 40_000)])
def test_cuda_kernels_equal_cpu_twin(policy, capacity, batch, monkeypatch):
    """Outputs and every state tensor bit-identical over batches with admission coins, sketch aging,
    eviction and expiry; one batch empty, one 2-D."""
    g = torch.Generator().manual_seed(5)
    batches = [skewed_ids(g, batch, 10 * capacity, (capacity // 2) * b) for b in range(10)]
    batches[3] = batches[3][:0]
    batches[4] = batches[4].view(batch // 50, 50)
    twin, out_twin, gpu, out_gpu = _twin_and_cuda(_dynamic_config(policy, capacity), batches, monkeypatch, row_offset=7)
    assert len(out_twin) == len(out_gpu)
    for k, (a, b) in enumerate(zip(out_twin, out_gpu)):
        assert torch.equal(a, b), k
    _assert_same_table(twin, gpu)
    metrics = gpu.metrics()
    assert metrics["evicted"] > 0 and metrics["rejected_admission"] > 0 and metrics["sketch_halvings"] > 0
    assert metrics["expired"] > 0 or policy == EvictionPolicy.LRU


@needs_cuda_kernels
@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_cuda_kernels_pick_the_twins_victims_among_ties(policy, monkeypatch):
    """Few newcomers against a large full table with many equal priorities: ties are broken by slot."""
    g = torch.Generator().manual_seed(11)
    fill = torch.randint(0, 1 << 40, (60_000,), generator=g)
    fill = torch.cat([fill, fill[:20_000], fill[:5_000]])
    repeats = torch.tensor([1, 2, 3, 4]).repeat(75)
    newcomers = torch.randint(1 << 41, 1 << 42, (300,), generator=g).repeat_interleave(repeats)
    config = DynamicTableConfig(
        capacity=50_000, eviction=policy, score_decay=0.9, admission=AdmissionConfig(min_count=1)
    )
    twin, out_twin, gpu, out_gpu = _twin_and_cuda(config, [fill, newcomers, newcomers, newcomers], monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(out_twin, out_gpu))
    _assert_same_table(twin, gpu)
    assert gpu.metrics()["evicted"] > 0


def test_cuda_state_falls_back_to_the_twin_on_host_copies(monkeypatch):
    """Without the CUDA kernels (here: forced off) a CUDA-resident table still gives the twin's results."""
    g = torch.Generator().manual_seed(3)
    batches = [skewed_ids(g, 2_000, 6_000, 300 * b) for b in range(6)]
    config = _dynamic_config(EvictionPolicy.FEATURE_SCORE, 600)
    monkeypatch.setenv("LIGHTNING_SPARSE_NATIVE", "0")
    twin, gpu = DynamicIdRemapper(config), DynamicIdRemapper(config).cuda()
    out_twin, out_gpu = _drive_dynamic(twin, batches, "cpu"), _drive_dynamic(gpu, batches, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(out_twin, out_gpu))
    assert gpu.slot_ids.is_cuda
    _assert_same_table(twin, gpu)


def test_cuda_resident_remapper_moves_without_casting_and_returns_slots_on_the_ids_device():
    remapper = DynamicIdRemapper(_dynamic_config(EvictionPolicy.LFU, 64))
    model = torch.nn.ModuleDict({"t": remapper}).to("cuda").half().to(torch.float16)
    assert all(buffer.is_cuda for buffer in remapper.buffers()) and remapper.device.type == "cuda"
    assert remapper.slot_last_time.dtype == torch.float64 and remapper.slot_score.dtype == torch.float32
    assert remapper.decay_powers.dtype == torch.float64 and remapper.slot_ids.dtype == torch.int64
    ids = torch.arange(40) * 1_000_003
    assert remapper.remap(ids, 0, now=0.0).slots.device.type == "cpu"  # host ids in, host slots out
    result = remapper.remap(ids.cuda(), 1, now=1.0)
    assert result.slots.is_cuda and result.assigned.is_cuda
    assert remapper.lookup(ids.int()).device.type == "cpu"
    assert remapper.expire(1, now=1.0).is_cuda
    before = {k: v.cpu() for k, v in remapper.state_dict().items()}
    model.cpu()
    assert all(buffer.device.type == "cpu" for buffer in remapper.buffers())
    assert all(torch.equal(v, before[k]) for k, v in remapper.state_dict().items())
    assert torch.equal(remapper.lookup(ids), result.slots.cpu())
