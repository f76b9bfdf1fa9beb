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
bad value is rejected before training starts, naming the field and the allowed values. What needs the
model (table names, sharding/device and optimizer/sharding combinations, dynamic capacities) is checked
in the launching process against the instantiated model, before any other process starts.

Every run writes into its own directory: loggers without a ``save_dir`` follow ``trainer.default_root_dir``,
each CSV/TensorBoard logger without a ``version`` gets a version directory no other run holds, and a run
whose config.yaml would land on another run's is refused before start-up.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
from enum import Enum
from typing import Any, Callable, NoReturn, Optional

import torch
from jsonargparse import Namespace
from jsonargparse.typing import get_registered_type, register_type
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

import lightning_sparse.data.criteo  # its enums and data module are selectable from YAML
import lightning_sparse.dynamic.config  # noqa: F401 - its enums are registered below
from lightning_sparse import __version__
from lightning_sparse.distributed.routes import resolve_tables
from lightning_sparse.loggers import default_wandb_to_offline, fill_save_dirs, reserve_version
from lightning_sparse.models import ClickModule
from lightning_sparse.strategies import SparseStrategy  # registers strategy="sparse"
from lightning_sparse.typed_config import NamedEnum

DEFAULT_MODEL = "lightning_sparse.models.DLRMModule"
DEFAULT_DATA = "lightning_sparse.data.SyntheticClickDataModule"
DEFAULT_STRATEGY = "lightning_sparse.SparseStrategy"
# The launching process hands the log versions it reserved to the processes Lightning starts (they inherit it).
_VERSIONS_ENV = "LIGHTNING_SPARSE_LOG_VERSIONS"


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
# One attempt of a jsonargparse Union report ("  - <reason>"); the wrappers around the real reasons are skipped.
_UNION_ATTEMPT = re.compile(r"^\s*- (.+)$", re.MULTILINE)
_WRAPPERS = (
    "Expected a ",
    "Does not validate against",
    "Problem with given class_path",
    "Not a valid subclass",
    "Given value",
    "Subtypes:",
    "Import path",
    "Not a subclass",
)


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
    # Errors raised by our constructors (e.g. "SparseOptimizerConfig.lr must be >= 0") sit deep inside the
    # report of every Union member jsonargparse tried; they are the attempts that are not wrappers.
    for attempt in _UNION_ATTEMPT.findall(message):
        attempt = attempt.strip()
        if not attempt.startswith(_WRAPPERS) and not attempt.endswith(":") and not any(attempt in c for c in causes):
            causes.append(attempt)
    return list(dict.fromkeys(causes))  # unique, in order


def exit_with_config_error(message: str) -> NoReturn:
    """Prints the config error (its causes first, then jsonargparse's report if there is one) and exits with 2."""
    causes = summarize_config_error(message) or [message]
    text = "error: invalid configuration:\n" + "\n".join(f"  - {cause}" for cause in causes)
    if causes != [message]:
        text += f"\n\ndetails:\n{message}"
    sys.stderr.write(text + "\n")
    sys.exit(2)


def check_before_launch(model: LightningModule, trainer: Trainer) -> None:
    """Raises ValueError for what SparseStrategy would refuse after start-up: unknown table names, shardings
    the device lacks, optimizer kinds the sharding cannot run, dynamic capacities that differ from the rows.

    It runs the strategy's own table resolution on the model built in the launching process.
    """
    strategy = trainer.strategy
    if isinstance(strategy, SparseStrategy):
        resolve_tables(
            model,
            strategy.root_device.type,
            strategy.sharding,
            strategy.sparse_optimizer_config,
            strategy.table_configs,
        )


class SparseArgumentParser(LightningArgumentParser):
    """Puts a short summary of what is wrong in the config above jsonargparse's detailed report."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        causes = summarize_config_error(message)
        if causes:
            summary = "invalid configuration:\n" + "\n".join(f"  - {cause}" for cause in causes)
            message = f"{summary}\n\ndetails:\n{message}"
        super().error(message, ex)


class SparseCLI(LightningCLI):
    """LightningCLI whose model takes its table layout from the data module, under SparseStrategy by default;
    config errors that need the model are found before start-up, and every run writes into its own directory."""

    _reserved: list[str]  # version directories this process created (removed again if the config is refused)

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

    # ------------------------------------------------------------------ run directory
    def _subcommand_config(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        self._reserved = []
        trainer = self._subcommand_config().trainer
        loggers = [
            c
            for c in (trainer.logger if isinstance(trainer.logger, list) else [trainer.logger])
            if isinstance(c, Namespace)
        ]
        fill_save_dirs(loggers, trainer.default_root_dir)
        self._reserve_log_versions(loggers)

    def _reserve_log_versions(self, loggers: list[Namespace]) -> None:
        """Gives every CSV/TensorBoard logger without a version a version directory of its own (global rank 0
        creates it; the processes it starts take the same number from the environment)."""
        inherited = json.loads(os.environ.get(_VERSIONS_ENV, "{}")) if rank_zero_only.rank > 0 else {}
        reserved = {}
        for config in loggers:
            module, _, name = config.class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            args = config.init_args
            if not issubclass(cls, (CSVLogger, TensorBoardLogger)) or args.get("version") is not None:
                continue
            root = os.path.abspath(os.path.join(args.get("save_dir") or ".", args.get("name", "lightning_logs") or ""))
            if rank_zero_only.rank > 0:
                if root in inherited:
                    args["version"] = inherited[root]
                continue
            args["version"] = reserved[root] = reserve_version(root)
            self._reserved.append(os.path.join(root, f"version_{reserved[root]}"))
        if rank_zero_only.rank == 0:
            os.environ[_VERSIONS_ENV] = json.dumps(reserved)

    def _release_reserved(self) -> None:
        for path in self._reserved:
            try:
                os.rmdir(path)  # only while still empty
            except OSError:
                pass

    def _check_run_directory(self) -> None:
        """Refuses a run whose config.yaml (and so its logs and checkpoints) would land on another run's."""
        if not self.save_config_callback or self.trainer.fast_dev_run or rank_zero_only.rank > 0:
            return
        directory = self.trainer.log_dir or self.trainer.default_root_dir
        path = os.path.abspath(os.path.join(directory, self.save_config_kwargs.get("config_filename", "config.yaml")))
        if os.path.exists(path):
            raise ValueError(
                f"{path} belongs to another run, and this run would write its config, logs and checkpoints next to "
                "it. Give the first logger no fixed version (a CSVLogger picks a new version_N), put a CSVLogger "
                "first in trainer.logger, or choose another trainer.default_root_dir / logger save_dir."
            )

    # --------------------------------------------------------------- instantiation
    def instantiate_classes(self) -> None:
        """Builds model, data and trainer, then checks what SparseStrategy would refuse after start-up; a bad
        config ends here with its cause first (exit code 2), before any other process is started."""
        try:
            super().instantiate_classes()
            check_before_launch(self.model, self.trainer)
            self._check_run_directory()
        except ValueError as error:
            self._release_reserved()
            exit_with_config_error(str(error))
        except BaseException:
            self._release_reserved()
            raise

    def after_fit(self) -> None:
        """Warns when fit ran no validation and so wrote no checkpoint (a run shorter than val_check_interval,
        e.g. on a small file), instead of ending as if all went well."""
        trainer = self.trainer
        callback = trainer.checkpoint_callback
        if callback is None or callback.best_model_path or callback.last_model_path or not trainer.is_global_zero:
            return
        if trainer.limit_val_batches == 0 or trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed:
            return
        rank_zero_warn(
            f"no validation ran and no checkpoint was written in {trainer.global_step} training steps: "
            f"val_check_interval={trainer.val_check_interval} was never reached. Set --trainer.val_check_interval "
            "to fewer training batches than the run has, or 1.0 to validate (and checkpoint) at the end of every epoch."
        )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-sparse`` console script (``serve-apply``: :mod:`lightning_sparse.serving.cli`)."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["--version"]:
        print(f"lightning-sparse {__version__}")
        return
    if argv[:1] == ["serve-apply"]:
        from lightning_sparse.serving.cli import main as serve_apply

        sys.exit(serve_apply(argv[1:]))
    default_wandb_to_offline()
    SparseCLI(
        ClickModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=SparseArgumentParser,
        args=args,
    )
    # PyTorch asks every trainer process to leave its process groups at the end of main(): left to the
    # interpreter's teardown, gloo's and NCCL's threads can abort a process that finished its work.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
