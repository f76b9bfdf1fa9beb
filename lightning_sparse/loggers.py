"""Logger defaults: Weights & Biases runs offline unless the user has a key, so a fresh machine never blocks on login."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

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
