"""``lightning-sparse fit|validate|test|predict --config X.yaml``: LightningCLI over our models, data and strategy.

The YAML selects the model and data module by class path (any :class:`ClickModule` /
``LightningDataModule`` subclass), and the strategy with its typed per-table options::

    trainer:
      strategy:
        class_path: lightning_sparse.SparseStrategy
        init_args:
          sharding: table_wise
          optimizer: {kind: rowwise_adagrad, lr: 0.05}
          tables: {t_cat_0: {sharding: column_wise}}

Everything is checked by jsonargparse against the type hints of those classes, so an unknown key or a
bad value is rejected before training starts, naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from enum import Enum
from typing import Any, Callable, NoReturn, Optional

from jsonargparse.typing import get_registered_type, register_type
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_sparse.data.criteo  # noqa: F401 - its enums and data module are selectable from YAML
import lightning_sparse.dynamic.config  # noqa: F401 - its enums are registered below
from lightning_sparse import __version__
from lightning_sparse.typed_config import NamedEnum
from lightning_sparse.loggers import default_wandb_to_offline
from lightning_sparse.models import ClickModule
from lightning_sparse.strategies import SparseStrategy  # noqa: F401 - registers strategy="sparse"

DEFAULT_MODEL = "lightning_sparse.models.DLRMModule"
DEFAULT_DATA = "lightning_sparse.data.SyntheticClickDataModule"
DEFAULT_STRATEGY = "lightning_sparse.SparseStrategy"


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _enum_parser(cls: type[NamedEnum]) -> Callable[[object], NamedEnum]:
    return lambda value: cls.parse(value, cls.__name__)


def register_enums_by_value() -> None:
    """Makes jsonargparse read and write our enums by value (``sharding: table_wise``), not by member name.

    jsonargparse's own enum support uses member names (``TABLE_WISE``) and prints them; registering each
    :class:`~lightning_sparse.typed_config.NamedEnum` with its ``parse`` keeps one spelling everywhere (Python,
    YAML, ``--print_config``) and the error that lists the allowed values.
    """
    for cls in _subclasses(NamedEnum):
        if get_registered_type(cls) is None:
            register_type(cls, serializer=_enum_value, deserializer=_enum_parser(cls))


def _enum_value(member: Enum) -> str:
    return member.value


_UNKNOWN_OPTION = re.compile(r"Problem with given class_path '([\w.]+)':\s*\n\s*Option '([\w.]+)' is not accepted")
_BAD_VALUE = re.compile(r"\w+='[^'\n]*' is not valid; allowed values: [^\n]*")


def _accepted_options(class_path: str) -> list[str]:
    """Init parameters of ``class_path`` (dataclass fields or ``__init__`` arguments), for error messages."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def summarize_config_error(message: str) -> list[str]:
    """The root causes buried in a jsonargparse error (which nests one attempt per Union member), one line each.

    Unknown options get the list of accepted ones (jsonargparse names only the offending key); bad enum
    values already carry the allowed values from :meth:`NamedEnum.parse`.
    """
    causes: list[str] = []
    for class_path, option in _UNKNOWN_OPTION.findall(message):
        accepted = ", ".join(_accepted_options(class_path)) or "see --help"
        causes.append(f"{class_path.rsplit('.', 1)[-1]} has no option {option!r}; accepted options: {accepted}")
    causes += _BAD_VALUE.findall(message)
    return list(dict.fromkeys(causes))  # unique, in order


class SparseArgumentParser(LightningArgumentParser):
    """Puts a short summary of what is wrong in the config above jsonargparse's detailed report."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        causes = summarize_config_error(message)
        if causes:
            summary = "invalid configuration:\n" + "\n".join(f"  - {cause}" for cause in causes)
            message = f"{summary}\n\ndetails:\n{message}"
        super().error(message, ex)


class SparseCLI(LightningCLI):
    """LightningCLI whose model takes its table layout from the data module, under SparseStrategy by default."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        register_enums_by_value()  # before any parser reads a type hint that names one of our enums
        kwargs.setdefault("dump_header", [f"lightning_sparse=={__version__}"])
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data module knows the feature layout (table sizes, dense width, keys); the model is built from it.
        for name in ("num_embeddings_per_feature", "num_dense_features", "feature_names"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.set_defaults(
            {
                "model": {"class_path": DEFAULT_MODEL},
                "data": {"class_path": DEFAULT_DATA},
                "trainer.strategy": {"class_path": DEFAULT_STRATEGY},
            }
        )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-sparse`` console script."""
    default_wandb_to_offline()
    SparseCLI(
        ClickModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # A rerun into the same log directory (e.g. W&B's fixed save_dir) replaces the saved config.
        save_config_kwargs={"overwrite": True},
        parser_class=SparseArgumentParser,
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
