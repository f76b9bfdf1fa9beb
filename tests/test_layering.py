"""The floors of the module map (docs/architecture.md, "Where it may import from"), enforced: no module of
lightning_sparse imports one above it.

Top to bottom: the CLI, the strategy with the Lightning callbacks (it installs some), ``distributed/``, then
``optim/ serving/ cache/ models/``, then ``dynamic/ data/`` and the typed configuration that YAML, Python
and the CLI share, then small utilities. Imports inside functions count too: a lazy import is still a
dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sparse"

FLOORS = {
    "cli": 0,
    "strategies": 1,
    "callbacks": 1,
    "distributed": 2,
    "optim": 3,
    "serving": 3,
    "cache": 3,
    "models": 3,
    "dynamic": 4,
    "data": 4,
    "config": 4,
    "validation": 4,
}
UTILITIES = 5  # typed_config, ops, table_init, durable, loggers, ...


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "lightning_sparse" or len(parts) == 1:
        return None  # outside the package, or the package's own __init__ (the public API re-exports)
    return FLOORS.get(parts[1], UTILITIES)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def upward_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        floor = _floor(module)
        if floor is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                target_floor = _floor(target)
                if target_floor is not None and target_floor < floor:
                    found.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target} (floor {target_floor} > {floor})"
                    )
    return found


def test_no_module_imports_one_above_it():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule is not vacuous: a distributed/ module importing the strategy is reported."""
    package = tmp_path / "lightning_sparse"
    (package / "distributed").mkdir(parents=True)
    (package / "distributed" / "bad.py").write_text(
        "def f():\n    from lightning_sparse.strategies import SparseStrategy\n"
    )
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert upward_imports() == [
        "lightning_sparse/distributed/bad.py:2 imports lightning_sparse.strategies (floor 1 > 2)"
    ]
