"""Callbacks the CLI tests name by class path (``cli_callbacks.SaveWhenTrainingStarts``)."""

import lightning.pytorch as pl


class SaveWhenTrainingStarts(pl.Callback):
    """Writes a checkpoint of the state a run starts training from (after any resume), to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)
