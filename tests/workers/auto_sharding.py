"""Fits a model of two tables with ``sharding: auto`` on 2 processes: ``t_onehot`` (one id per sample) and
``t_pool20`` (20 ids per sample), same size. The strategy reads the first batches at setup and picks per table
the type that sends the fewest bytes; the worker records the plan, the decision, the hint computed here from the
same batches (rebuilt from the dataset in the DistributedSampler's order, not through the loader), the samples
each training step saw, the fit summary rank 0 printed and the choice its checkpoint holds."""

import argparse
import contextlib
import io
import json

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_sparse import SparseStrategy
from lightning_sparse.callbacks import FitSummary
from lightning_sparse.distributed.checkpoint import read_trainer_state
from lightning_sparse.distributed.comm_hint import BatchStats, cheapest, sharding_hint

ROWS, DIM, BATCH, SAMPLES, READ = 100, 8, 64, 512, 3
POOLING = {"t_onehot": 1, "t_pool20": 20}


class Samples(Dataset):
    """Sample ``i``: its index, one id for ``f_t_onehot`` and 20 for ``f_t_pool20``, a label."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        ids = {t: torch.randint(0, ROWS, (p,), generator=g) for t, p in POOLING.items()}
        return {"index": i, "ids": ids, "label": float(i % 2)}


def collate(items: list[dict]) -> dict:
    keys = [f"f_{t}" for t in POOLING]
    values = torch.cat([torch.cat([it["ids"][t] for it in items]) for t in POOLING])
    lengths = torch.tensor([p for p in POOLING.values() for _ in items], dtype=torch.int64)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "kjt": kjt,
        "label": torch.tensor([it["label"] for it in items]),
    }


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        configs = [
            EmbeddingBagConfig(name=t, embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f_{t}"])
            for t in POOLING
        ]
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
        self.head = torch.nn.Linear(DIM * len(POOLING), 1)
        self.seen: list[list[int]] = []

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(kjt)
        return self.head(torch.cat([pooled[f"f_{t}"] for t in POOLING], dim=1)).squeeze(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        return torch.nn.functional.binary_cross_entropy_with_logits(self(batch["kjt"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Samples(), batch_size=BATCH, shuffle=True, collate_fn=collate)


def expected_order(rank: int, world: int, epoch: int) -> list[int]:
    """The samples of ``rank`` in ``epoch``, as the DistributedSampler Lightning injects orders them (seed 0)."""
    sampler = DistributedSampler(Samples(), num_replicas=world, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    return list(sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt-out", required=True)
    parser.add_argument("--ckpt-in", default=None, help="resume from this checkpoint")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    strategy = SparseStrategy(sharding="auto", start_method="popen", auto_sharding_batches=READ)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[FitSummary()],
    )  # fmt: skip
    model = Model()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.fit(model, ckpt_path=args.ckpt_in)
    trainer.save_checkpoint(args.ckpt_out)
    rank, world = trainer.global_rank, trainer.world_size

    # the hint from the first READ batches of each rank, rebuilt from the dataset
    order = expected_order(rank, world, 0)
    stats = BatchStats()
    for b in range(READ):
        batch = collate([Samples()[i] for i in order[b * BATCH : (b + 1) * BATCH]])
        stats.add(batch["kjt"], {f"f_{t}": t for t in POOLING}, {t: ROWS for t in POOLING}, rank, world)
        stats.steps += 1
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, stats)
    hint = sharding_hint(gathered, {t: (ROWS, DIM) for t in POOLING})
    decision = strategy.auto_sharding
    allowed = {t: tuple(decision.candidates[t]) for t in POOLING}
    seen = [None] * world
    torch.distributed.all_gather_object(
        seen, {"seen": model.seen, "expected": [expected_order(rank, world, e) for e in (0, 1)]}
    )
    if trainer.is_global_zero:
        plan = {t: s.sharding_type for p in strategy.distributed_model.plan.plan.values() for t, s in p.items()}
        result = {
            "plan": plan,
            "routes": {t.name: t.route.value for t in strategy.embedding_tables.tables.values()},
            "choice": {t: s.value for t, s in decision.choice.items()},
            "decision_bytes": decision.bytes,
            "batches": decision.batches,
            "hint": hint,
            "hint_choice": {t: cheapest({t: hint[t]}, allowed[t])[t] for t in POOLING},
            "seen": seen,
            "printed": printed.getvalue(),
            "saved_choice": read_trainer_state(args.ckpt_out)["auto_sharding"],
        }
        with open(args.result, "w") as f:
            json.dump(result, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
