"""``lightning-sparse serve-apply --store lmdb:PATH|redis://HOST:PORT --exports DIR [--once]``.

Follows an export directory written by :class:`~lightning_sparse.serving.DeltaExport` and applies each new
version to the store, in order, each in one transaction; prints one JSON line per applied version
(``version``, ``step``, ``full``, ``applied_at``: wall time after the commit). Errors (a corrupt or partial
version, a schema mismatch, an unreachable store) print ``error: ...`` and exit with code 1; the store
stays at the last version applied.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

from lightning_sparse.serving.apply import follow
from lightning_sparse.serving.format import ExportError
from lightning_sparse.serving.stores import StoreUnavailableError, VersionUpdate, open_store


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-sparse serve-apply", description=__doc__.split("\n\n")[1])
    parser.add_argument("--store", required=True, help="lmdb:PATH (embedded) or redis://HOST:PORT[/DB]")
    parser.add_argument("--exports", required=True, help="the export directory (DeltaExport's directory)")
    parser.add_argument("--once", action="store_true", help="apply what is there, then exit")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="how often to look for new versions")
    args = parser.parse_args(argv)

    def report(update: VersionUpdate) -> None:
        line = {
            "version": update.version,
            "step": update.step,
            "full": update.full,
            "exported_at": update.time,
            "applied_at": time.time(),
        }
        print(json.dumps(line), flush=True)

    try:
        with open_store(args.store) as store:
            version = follow(store, Path(args.exports), args.poll_seconds, args.once, report)
    except (ExportError, StoreUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    print(json.dumps({"store_version": version}), flush=True)
    return 0
