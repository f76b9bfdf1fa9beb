"""SparseStrategy: Lightning's DDP strategy with TorchRec-sharded, fbgemm-fused embedding tables.

The strategy wires components into Lightning's hooks and holds no state of its own: the sharded model and
the components that own its state (:class:`~lightning_sparse.distributed.sharded_model.ShardedModel`: the
DMP, the resolved tables, the sparse optimizer with its hyper-parameters, the dynamic and cached tables) are built once
per LightningModule and found again by later stages and Trainers; checkpoints are read in one place,
:meth:`SparseStrategy.load_checkpoint`. Components get their rank, world size and collectives as a
:class:`~lightning_sparse.distributed.collectives.Collectives`, never the strategy.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Callable, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.optim import Optimizer
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.cache.prefetch import LookaheadLoader
from lightning_sparse.cache.tables import CachedTables
from lightning_sparse.callbacks import CommunicationMonitor
from lightning_sparse.config import PipelineConfig, ShardingType, SparseOptimizerConfig, TableConfig
from lightning_sparse.distributed import checkpoint as sharded_checkpoint
from lightning_sparse.distributed.auto_sharding import AutoShardingDecision
from lightning_sparse.distributed.collectives import Collectives, collective_device
from lightning_sparse.distributed.comm import CommunicationCounter, CommunicationReport, communication_counter
from lightning_sparse.distributed.planning import shard_tables
from lightning_sparse.distributed.routes import EmbeddingTables, embedding_parameters
from lightning_sparse.distributed.sharded_dynamic import DynamicTables
from lightning_sparse.distributed.sharded_model import ShardedModel, sharded_model_of
from lightning_sparse.frozen_heap import FrozenHeap
from lightning_sparse.strategies import pipelines
from lightning_sparse.strategies.auto_sharding import (
    check_resumed_auto_sharding,
    checked_batches,
    measured_auto_sharding,
)
from lightning_sparse.strategies.launcher import SparseScriptLauncher
from lightning_sparse.strategies.signals import (
    OnSignal,
    SignalConnector,
    StopAtStepBoundary,
    StopRequest,
    skip_lightning_sigterm_broadcast,
)
from lightning_sparse.trainer_attrs import add_callback_once
from lightning_sparse.validation import BadIdPolicy, InputChecks, NonFinitePolicy

log = logging.getLogger(__name__)

# Collectives wait this long for a stuck rank (torch's gloo default is 30 minutes). A dead rank is detected
# sooner (see launcher.py); raise it if a rank can legitimately lag the others longer (slow checkpoint writes).
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# Where the sparse optimizer's per-table hyper-parameters (lr, ...) live in the trainer state.
_SPARSE_HYPERPARAMETERS_KEY = "sparse_optimizer_hyperparameters"
# Where the sharding ``auto`` chose per table lives in the trainer state.
_AUTO_SHARDING_KEY = "auto_sharding"


class SparseStrategy(DDPStrategy):
    """Shards the LightningModule's TorchRec embedding tables and fuses their optimizer into backward.

    Dense modules stay under DDP and are trained by whatever ``configure_optimizers`` returns (the
    embedding weights are removed from those optimizers). Embedding tables are trained by the sparse
    optimizer configured here, per table if wanted.

    Args:
        sharding: default sharding of every table; ``auto``: the type that sends the fewest bytes per step for
            the first training batches (``auto_sharding_batches``), or TorchRec's planner's choice where no batch
            decides (``distributed/auto_sharding.py``).
        optimizer: default sparse optimizer of every table.
        tables: per-table overrides of ``sharding`` / ``optimizer``, keyed by table name.
        static_graph: passed to the DDP wrapper of the dense modules.
        find_unused_parameters: passed to the DDP wrapper of the dense modules.
        process_group_backend: ``gloo`` / ``nccl``; default by accelerator.
        timeout: timeout of every collective (default 5 minutes): how long the ranks wait for a stuck rank.
        start_method: how Lightning launches processes (``popen`` for scripts, ``spawn`` for notebooks/tests).
        bad_ids: an id outside a static table's rows is an ``error`` (naming table, feature and value), or
            ``drop``: removed from its bag and counted as ``input/dropped_ids``. Dynamic tables take any id.
        non_finite: a sample with a NaN/infinite dense feature or label is an ``error``, or ``skip``: removed
            from the batch and counted as ``input/skipped_samples``.
        on_signal: what a SIGTERM/SIGINT to any rank does: every rank stops together within two step boundaries
            (``stop``), after saving a checkpoint when fitting (``checkpoint_and_stop``); see ``signals.py``.
        signal_checkpoint_path: where ``checkpoint_and_stop`` saves; default ``<default_root_dir>/on_signal.ckpt``.
        count_communication: count the bytes of every collective per training step, by table and sharding type
            (``communication_report()``, ``comm/...`` metrics, fit summary); off by default: it adds Python work
            to every collective (see ``benchmarks/RESULTS.md``).
        pipeline: ``none`` | ``sparse_dist`` | ``semi_sync`` | ``{kind: hybrid, staleness: S}``: how the steps'
            stages overlap (:class:`~lightning_sparse.config.PipelineConfig`, ``strategies/pipelines.py``).
        auto_sharding_batches: training batches each rank reads at setup, when fitting on several processes
            with ``auto`` tables, to give each of them the sharding type that sends the fewest bytes for those
            batches (``distributed/auto_sharding.py``); ``0``: TorchRec's planner picks from sizes alone.
    """

    strategy_name = "sparse"

    def __init__(
        self,
        sharding: ShardingType = ShardingType.AUTO,
        optimizer: Optional[SparseOptimizerConfig] = None,
        tables: Optional[dict[str, TableConfig]] = None,
        static_graph: bool = False,
        find_unused_parameters: bool = False,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = DEFAULT_COLLECTIVE_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        bad_ids: BadIdPolicy = BadIdPolicy.ERROR,
        non_finite: NonFinitePolicy = NonFinitePolicy.ERROR,
        on_signal: OnSignal = OnSignal.STOP,
        signal_checkpoint_path: Optional[str] = None,
        count_communication: bool = False,
        pipeline: Optional[PipelineConfig] = None,
        auto_sharding_batches: int = 4,
    ) -> None:
        # Accelerator, devices, cluster environment, precision and checkpoint IO are filled in by the
        # Trainer (as for any registered strategy), which keeps this signature to what a YAML config sets.
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method)
        self.sharding = ShardingType.parse(sharding, "SparseStrategy.sharding")
        self.sparse_optimizer_config = optimizer or SparseOptimizerConfig()
        self.table_configs = {name: _as_table_config(name, cfg) for name, cfg in (tables or {}).items()}
        self.static_graph = static_graph
        self.find_unused_parameters = find_unused_parameters
        self._sharded: Optional[ShardedModel] = None
        self.bad_ids = BadIdPolicy.parse(bad_ids, "SparseStrategy.bad_ids")
        self.non_finite = NonFinitePolicy.parse(non_finite, "SparseStrategy.non_finite")
        self._input_checks: Optional[InputChecks] = None
        self.on_signal = OnSignal.parse(on_signal, "SparseStrategy.on_signal")
        self.signal_checkpoint_path = signal_checkpoint_path
        self._stop_request = StopRequest()
        self.count_communication = count_communication
        self._comm: Optional[CommunicationCounter] = None
        self.pipeline = PipelineConfig.parse(pipeline, "SparseStrategy.pipeline")
        self._pipeline: Optional[pipelines.PipelineDriver] = None
        self.auto_sharding_batches = checked_batches(auto_sharding_batches)
        # what ``auto`` chose from the batches read at setup (None: nothing was read), for the fit summary
        self.auto_sharding: Optional[AutoShardingDecision] = None
        self._heap = FrozenHeap()  # kept out of full GC collections while fitting (frozen_heap.py)

    # ------------------------------------------------------------------ setup
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Checkpoints hold sharded tensors: they can only be read into the sharded model.
        return True

    def connect(self, model: Any) -> None:
        """Picks up the sharded model of ``model`` left by an earlier stage or Trainer, before anything else
        runs (see ``distributed/sharded_model.py`` for how it is kept alive)."""
        super().connect(model)
        self._sharded = sharded_model_of(model)

    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and trainer.accumulate_grad_batches > 1:
            raise MisconfigurationException(
                f"SparseStrategy: accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported. "
                "Embedding rows are updated inside the backward pass by fused kernels, so gradients of sparse "
                "tables cannot be accumulated across batches. Use accumulate_grad_batches=1 with a larger batch."
            )
        self._install_stop_handling(trainer)
        self.precision_plugin.convert_module(self.model)
        if self._sharded is None:
            self._sharded = self._shard(self._module)
        self.model = self._sharded.dmp
        if self.count_communication:  # bytes of every collective, per table and sharding (distributed/comm.py)
            sharded = self._sharded
            self._comm = communication_counter(sharded.dmp, sharded.tables, sharded.dynamic, sharded.optimizer.combined)
            add_callback_once(trainer, CommunicationMonitor(self._comm), first=True)
        if fitting:
            self.setup_optimizers(trainer)
            self._pipeline = pipelines.build_driver(self, trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
            self._heap.freeze()  # no full GC pass over the model and libraries in mid-step (frozen_heap.py)

    @property
    def collectives(self) -> Collectives:
        """This strategy's rank and world size for the components (they never hold the strategy)."""
        return Collectives.of_strategy(self)

    def _shard(self, module: LightningModule) -> ShardedModel:
        """Plans and shards ``module`` and builds the components that own its state (once per module)."""
        tables_group = pipelines.embedding_process_group(self.pipeline)
        process_group = tables_group or dist.group.WORLD
        if process_group is None:  # Lightning's setup_environment creates it before setup()
            raise RuntimeError("SparseStrategy: no process group; shard the model inside Trainer.fit/validate/test")
        self.auto_sharding = measured_auto_sharding(
            module.trainer, module, self.root_device.type, process_group, self.sharding, self.sparse_optimizer_config,
            self.table_configs, self.auto_sharding_batches, local_world_size=self.num_processes,
        )  # fmt: skip
        overrides = self.auto_sharding.overrides(self.table_configs) if self.auto_sharding else self.table_configs
        dmp, tables, plan = shard_tables(
            module,
            self.root_device,
            process_group,
            self.sharding,
            self.sparse_optimizer_config,
            overrides,
            local_world_size=self.num_processes,
            static_graph=self.static_graph,
            find_unused_parameters=self.find_unused_parameters,
            dense_process_group=dist.group.WORLD if tables_group is not None else None,
            column_widths=self.auto_sharding.column_widths() if self.auto_sharding else None,
        )
        return ShardedModel.build(module, dmp, tables, plan, self.root_device, self.collectives)

    def setup_optimizers(self, trainer: Trainer) -> None:
        """Builds the user's (dense) optimizers, then removes the embedding weights from them."""
        super().setup_optimizers(trainer)
        owned_by_sparse = {id(p) for p in embedding_parameters(self._module).values()}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in owned_by_sparse]

    @property
    def _module(self) -> LightningModule:
        """The LightningModule this strategy runs; Lightning attaches it before any hook below runs."""
        module = self.lightning_module
        if module is None:
            raise RuntimeError("SparseStrategy has no LightningModule: it is attached by Trainer.fit/validate/test")
        return module

    # ------------------------------------------------------------- training
    @property
    def sharded_model(self) -> ShardedModel:
        """The sharded model and the components that own its state (kept across stages and Trainers)."""
        if self._sharded is None:
            raise RuntimeError("SparseStrategy's sharded model is available after the Trainer has set up the model.")
        return self._sharded

    @property
    def sparse_optimizer(self) -> KeyedOptimizer:
        """The optimizer of every embedding table (a CombinedOptimizer: ``fused`` and ``native_kernels``)."""
        return self.sharded_model.optimizer.combined

    @property
    def distributed_model(self) -> DistributedModelParallel:
        """The DistributedModelParallel wrapping the LightningModule (kept across stages)."""
        return self.sharded_model.dmp

    @property
    def embedding_tables(self) -> EmbeddingTables:
        return self.sharded_model.tables

    def communication_report(self) -> CommunicationReport:
        """This rank's bytes sent and received per training step, by collective channel (needs ``count_communication``)."""
        if self._comm is None:
            raise RuntimeError("SparseStrategy.communication_report() needs SparseStrategy(count_communication=True).")
        return self._comm.report()

    def all_reduce_bytes(self, value: int) -> int:
        """Sum of an integer over all ranks (e.g. bytes of local shards), or the value without a process group."""
        total = torch.tensor([value], dtype=torch.int64, device=collective_device())  # nccl refuses CPU tensors
        return int(self.reduce(total, reduce_op="sum").item())

    def set_sparse_lr(self, lr: float) -> None:
        """Sets the learning rate of every embedding table (applied from the next step, checkpointed)."""
        if self._pipeline is not None:
            self._pipeline.settle()  # the row updates already queued on the pipeline's worker keep the old rate
        self.sharded_model.optimizer.set_lr(lr)

    def sparse_param_groups(self) -> list[dict[str, Any]]:
        """The param groups that hold the tables' hyper-parameters (see ``SparseOptimizer.param_groups``)."""
        return self.sharded_model.optimizer.param_groups()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self.sharded_model.optimizer.push_learning_rates()
        args = self._checked(args, training=True)
        dynamic = self.dynamic_tables
        if dynamic is not None and self._pipeline is not None:  # remapped as it entered the pipeline
            args = (move_data_to_device(self._pipeline.trained_batch(), self.root_device),) + args[1:]
        elif dynamic is not None:
            args = (self._remap_for_training(args[0], dynamic),) + args[1:]
        if self.cached_tables is not None:  # ids -> scratchpad slots, planned k batches ahead (cache/tables.py)
            args = (self.cached_tables.before_training_step(args[0]),) + args[1:]
            self._module.log_dict(self.cached_tables.metrics(), on_step=True, on_epoch=False)
        if self._pipeline is None:
            return super().training_step(*args, **kwargs)
        self._pipeline.before_forward()
        output = super().training_step(*args, **kwargs)
        self._pipeline.after_forward(self._module)
        return output

    def process_dataloader(self, dataloader: object) -> object:
        """The train loader, read through the pipeline (which looks ahead) when there is one, or ahead for the
        cached tables' planner (``cache/prefetch.py``); never both (``pipelines.check_pipeline_setup``)."""
        dataloader = super().process_dataloader(dataloader)
        if not self._module.trainer.training:
            return dataloader
        if self._pipeline is not None:
            return self._pipeline.wrap(dataloader)
        cache = self.cached_tables
        if cache is None:
            return dataloader
        return LookaheadLoader(
            dataloader, max(c.batches_ahead for c in cache.configs.values()), cache.new_pass, cache.on_batch_read
        )

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._pipeline is not None:
            self._pipeline.drain()  # no batch in flight while the tables serve evaluation lookups

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return super().validation_step(*self._remap_for_evaluation(self._checked(args)), **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return super().test_step(*self._remap_for_evaluation(self._checked(args)), **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return super().predict_step(*self._remap_for_evaluation(self._checked(args)), **kwargs)

    # ----------------------------------------------------------- input checks
    @property
    def input_checks(self) -> InputChecks:
        """The checks every batch passes before the lookup (:mod:`lightning_sparse.validation`)."""
        if self._input_checks is None or self._input_checks.tables is not self.embedding_tables:
            self._input_checks = InputChecks.for_tables(self.embedding_tables, self.bad_ids, self.non_finite)
        return self._input_checks

    def _checked(self, args: tuple, training: bool = False) -> tuple:
        return self.input_checks.check_step(args, self.lightning_module if training else None, self.root_device)

    # --------------------------------------------------------- dynamic tables
    @property
    def dynamic_tables(self) -> Optional[DynamicTables]:
        """The hash tables of the model's dynamic tables (None when it has none)."""
        return self._sharded.dynamic if self._sharded is not None else None

    def _remap_for_training(self, batch: Any, dynamic: DynamicTables) -> Any:
        step = self._module.trainer.global_step
        assigned_rows: dict[str, torch.Tensor] = {}

        def remap(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
            remapped, assigned = dynamic.remap_for_training(kjt, step)
            assigned_rows.update(assigned)
            return remapped

        batch = apply_to_collection(batch, KeyedJaggedTensor, remap)
        dynamic.recycle_rows(assigned_rows, step)
        return batch

    def _remap_for_evaluation(self, args: tuple) -> tuple:
        if self.dynamic_tables is not None and args:
            args = (apply_to_collection(args[0], KeyedJaggedTensor, self.dynamic_tables.remap_for_evaluation),) + args[
                1:
            ]
        if self.cached_tables is not None and args:
            args = (self.cached_tables.before_evaluation_step(args[0]),) + args[1:]
        return args

    @property
    def cached_tables(self) -> Optional[CachedTables]:
        """The scratchpads and backing stores of the model's cached tables (None when it has none)."""
        return self._sharded.cache if self._sharded is not None else None

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union[LightningModule, nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        """Steps the dense optimizer (its closure runs forward/backward, which updates fbgemm-fused tables),
        then our kernels' optimizer, which updates the native and data-parallel tables after backward."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._pipeline is None or not self._pipeline.owns_row_updates:
            self.sharded_model.optimizer.step_kernels()
        if self._pipeline is not None:
            self._pipeline.after_optimizer_step()
        return output

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        """Writes a sharded checkpoint directory; must run on every rank (Lightning calls it on all)."""
        if storage_options is not None:
            raise TypeError("SparseStrategy.save_checkpoint does not take storage_options")
        if self._pipeline is not None:
            self._pipeline.drain()  # a checkpoint holds no batch in flight (see strategies/pipelines.py)
        sharded = self.sharded_model
        sparse = sharded.optimizer.state_dict()
        trainer_state = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        trainer_state[_SPARSE_HYPERPARAMETERS_KEY] = dict(sparse["hyperparameters"])
        if self.auto_sharding is not None:  # what auto chose, checked when the checkpoint is resumed
            trainer_state[_AUTO_SHARDING_KEY] = {name: s.value for name, s in self.auto_sharding.choice.items()}
        sharded_checkpoint.save_sharded(
            filepath,
            model_state=checkpoint["state_dict"],
            sparse_optimizer_state=sparse["optimizer"],
            dynamic_tables_state=sharded.dynamic.state_dict() if sharded.dynamic is not None else {},
            trainer_state=trainer_state,
            is_global_zero=self.is_global_zero,
            collectives=self.collectives,
            cached_tables_state=sharded.cache.state_dict() if sharded.cache is not None else None,
        )

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Loads a checkpoint into the model and every component, here and only here: the tensors are read in
        place into the current (possibly differently sharded) state dicts, then each component loads its
        state. The sparse optimizer takes its state and hyper-parameters when fitting, as Lightning restores
        optimizers only then. Returns the rest for Lightning (loops, dense optimizers, callbacks)."""
        sharded = self.sharded_model
        check_resumed_auto_sharding(checkpoint_path, _AUTO_SHARDING_KEY, sharded.tables)
        model_state = self._module.state_dict()
        sparse_state = sharded.optimizer.combined.state_dict()
        dynamic_state = sharded.dynamic.state_dict() if sharded.dynamic is not None else {}
        cache_state = sharded.cache.state_dict() if sharded.cache is not None else None
        trainer_state = sharded_checkpoint.load_sharded(
            checkpoint_path,
            model_state,
            sparse_state,
            dynamic_state,
            collectives=self.collectives,
            cached_tables_state=cache_state,
        )
        if sharded.dynamic is not None:
            sharded.dynamic.load_state_dict(dynamic_state)
        if sharded.cache is not None:
            assert cache_state is not None  # read above, as the cache exists
            sharded.cache.load_state_dict(cache_state)
        hyperparameters = trainer_state.pop(_SPARSE_HYPERPARAMETERS_KEY, None)
        trainer_state.pop(_AUTO_SHARDING_KEY, None)
        if self._module.trainer.state.fn == TrainerFn.FITTING:
            sharded.optimizer.load_state_dict({"optimizer": sparse_state, "hyperparameters": hyperparameters})
        trainer_state["state_dict"] = model_state
        return trainer_state

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # load_checkpoint already read the tensors in place; this re-applies them through the modules'
        # own load hooks (which keep TorchRec's sharded views consistent).
        self._module.load_state_dict(checkpoint["state_dict"], strict=strict)

    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Deletes a checkpoint directory (ModelCheckpoint's old top-k) so that a removal cut short never
        leaves a directory that passes for a checkpoint."""
        if self.is_global_zero:
            sharded_checkpoint.remove_sharded(filepath)

    # -------------------------------------------------------------- teardown
    def teardown(self) -> None:
        """Unwraps ``self.model`` as Lightning expects; the sharded model stays with this strategy (and so with
        the module's Trainer), so a later ``trainer.test`` or another Trainer reuses it."""
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None
        self._heap.release()
        self.model = self.lightning_module
        if self._comm is not None:
            self._comm.uninstall()
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    # ------------------------------------------------------ stops and failures
    def _configure_launcher(self) -> None:
        """popen launches (scripts, the CLI) use SparseScriptLauncher: it forwards a SIGTERM/SIGINT during
        start-up to the ranks it started and names a rank that dies (see launcher.py)."""
        super()._configure_launcher()
        if self._start_method == "popen":
            assert self.cluster_environment is not None  # Lightning sets it before configuring the launcher
            self._launcher = SparseScriptLauncher(
                self._stop_request, self.cluster_environment, self.num_processes, self.num_nodes
            )

    def _install_stop_handling(self, trainer: Trainer) -> None:
        """Replaces Lightning's signal connector (whose SIGTERM handler runs a collective) by flag-only
        handlers, and adds the callback where the ranks agree to stop (see signals.py). Runs in ``setup``:
        the trainer registers its signal handlers right after."""
        if not isinstance(trainer._signal_connector, SignalConnector):
            trainer._signal_connector = SignalConnector(trainer, self._stop_request)
        skip_lightning_sigterm_broadcast(trainer)
        add_callback_once(trainer, StopAtStepBoundary(self._stop_request, self.on_signal, self.signal_checkpoint_path))

    def on_exception(self, exception: BaseException) -> None:
        """Names a dead rank in the error of a collective that failed because of it."""
        super().on_exception(exception)
        watch = getattr(self._launcher, "watch", None)
        if watch is not None:
            watch.explain(exception)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="TorchRec-sharded embedding tables with fused sparse optimizers"
        )
        strategy_registry.register(
            "sparse_spawn", cls, description="SparseStrategy launched with start_method='spawn'", start_method="spawn"
        )


def _as_table_config(name: str, value: Union[TableConfig, Mapping[str, Any]]) -> TableConfig:
    if isinstance(value, TableConfig):
        return value
    from lightning_sparse.config import build_dataclass

    return build_dataclass(TableConfig, dict(value), f"SparseStrategy(tables[{name!r}])")
