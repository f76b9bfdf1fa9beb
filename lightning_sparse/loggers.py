"""Logger defaults: Weights & Biases runs offline unless the user has a key, so a fresh machine never blocks on
login; loggers whose directory follows ``trainer.default_root_dir``; one version directory per run."""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch.loggers

_WANDB_HOST = "api.wandb.ai"


def wandb_credentials_available() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``wandb login`` stored a key (in ~/.netrc or ``$NETRC``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.is_file():
        return False
    try:
        hosts = netrc.netrc(str(path)).hosts
    except (netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", _WANDB_HOST).split("://")[-1].rstrip("/")
    return host in hosts


def default_wandb_to_offline() -> str:
    """Sets ``WANDB_MODE=offline`` unless a mode is already chosen or credentials exist; returns the mode in effect.

    Without this, ``WandbLogger`` asks interactively for an API key (or fails in batch jobs). Offline runs
    are written under ``<save_dir>/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``.
    """
    if "WANDB_MODE" not in os.environ and not wandb_credentials_available():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


class CSVLogger(lightning.pytorch.loggers.CSVLogger):
    """Lightning's CSVLogger whose ``save_dir`` may be left out: ``lightning-sparse`` then writes it under
    ``trainer.default_root_dir``, so ``--trainer.default_root_dir`` moves the logs with every other output.

    From Python, a ``save_dir`` left out is the current directory (as ``default_root_dir``'s own default).
    """

    def __init__(
        self,
        save_dir: Optional[str] = None,
        name: Optional[str] = "lightning_logs",
        version: Optional[Union[int, str]] = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(
            save_dir=os.getcwd() if save_dir is None else save_dir,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )


class WandbLogger(lightning.pytorch.loggers.WandbLogger):
    """Lightning's WandbLogger whose ``save_dir`` left out is ``trainer.default_root_dir`` under ``lightning-sparse``
    (the current directory from Python); every other argument is WandbLogger's."""

    def __init__(self, save_dir: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(save_dir=os.getcwd() if save_dir is None else save_dir, **kwargs)


def fill_save_dirs(logger_configs: list[Any], default_root_dir: Optional[str]) -> None:
    """Sets ``save_dir`` of the parsed logger configs (``{class_path, init_args}``) of our loggers that left it
    out to ``default_root_dir`` (the current directory when that is unset too)."""
    ours = {f"{__name__}.{cls.__name__}" for cls in (CSVLogger, WandbLogger)}
    for config in logger_configs:
        init_args = getattr(config, "init_args", None)
        if getattr(config, "class_path", None) in ours and init_args is not None and init_args.get("save_dir") is None:
            init_args["save_dir"] = default_root_dir or os.getcwd()


def reserve_version(root: str) -> int:
    """Creates ``root/version_N`` for the first N after the existing versions that no other run has created,
    and returns N. ``os.mkdir`` is atomic, so two runs started together in one directory get two versions."""
    os.makedirs(root, exist_ok=True)
    taken = [int(d[len("version_") :]) for d in os.listdir(root) if re.fullmatch(r"version_\d+", d)]
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{version}"))
            return version
        except FileExistsError:
            version += 1
