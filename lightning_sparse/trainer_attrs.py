"""Typed access to the ``Trainer`` attributes that Lightning sets outside ``Trainer.__init__``.

``trainer.callbacks`` and ``trainer.datamodule`` exist on every trainer (Lightning's connectors assign them
while the trainer is built and while it runs), but ``Trainer`` does not declare them, so a type checker
cannot see them. These functions are the one place that says what they hold.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import Callback, LightningDataModule, Trainer


def trainer_callbacks(trainer: Trainer) -> list[Callback]:
    """The trainer's callback list itself (appending to it adds a callback to the running trainer)."""
    return trainer.callbacks  # type: ignore[attr-defined]  # assigned by Lightning's CallbackConnector


def add_callback_once(trainer: Trainer, callback: Callback, first: bool = False) -> None:
    """Adds ``callback`` unless the trainer already has one of its class (e.g. the user listed it in YAML);
    ``first`` puts it before the others."""
    callbacks = trainer_callbacks(trainer)
    if any(isinstance(c, type(callback)) for c in callbacks):
        return
    if first:
        callbacks.insert(0, callback)
    else:
        callbacks.append(callback)


def trainer_datamodule(trainer: Trainer) -> Optional[LightningDataModule]:
    """The data module the trainer runs, None when it was given data loaders."""
    return getattr(trainer, "datamodule", None)  # assigned by Lightning's DataConnector
