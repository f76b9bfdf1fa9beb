"""SparseStrategy: Lightning's DDP strategy with TorchRec-sharded, fbgemm-fused embedding tables."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Callable, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.optim import Optimizer
from lightning_utilities.core.apply_func import apply_to_collection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sparse.cache.prefetch import LookaheadLoader
from lightning_sparse.cache.tables import CachedTables
from lightning_sparse.config import ShardingType, SparseOptimizerConfig, TableConfig, TableRoute
from lightning_sparse.distributed import checkpoint as sharded_checkpoint
from lightning_sparse.distributed.collectives import collective_device
from lightning_sparse.distributed.planning import shard_tables, table_owners
from lightning_sparse.distributed.routes import EmbeddingTables, embedding_parameters
from lightning_sparse.distributed.sharded_dynamic import DynamicTables, dynamic_tables_of
from lightning_sparse.optim.native_kernel_optimizer import NativeKernelOptimizer, attach_row_captures
from lightning_sparse.strategies.launcher import SparseScriptLauncher
from lightning_sparse.strategies.signals import OnSignal, SignalConnector, StopAtStepBoundary, StopRequest
from lightning_sparse.validation import BadIdPolicy, InputChecks, NonFinitePolicy

log = logging.getLogger(__name__)

# The DistributedModelParallel that owns a LightningModule's sharded tables is kept on the module itself
# (not as a submodule), so any later Trainer or stage reuses it instead of sharding twice.
_DMP_ATTRIBUTE = "_lightning_sparse_dmp"
_TABLES_ATTRIBUTE = "_lightning_sparse_tables"
_DYNAMIC_ATTRIBUTE = "_lightning_sparse_dynamic_tables"
_CACHE_ATTRIBUTE = "_lightning_sparse_cached_tables"
# Where the cached tables' backing stores sit among the checkpoint's dynamic-table state.
_CACHE_PREFIX = "lookahead_cache."
# Collectives wait this long for a stuck rank (torch's gloo default is 30 minutes). A dead rank is detected
# sooner (see launcher.py); raise it if a rank can legitimately lag the others longer (slow checkpoint writes).
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# Where the sparse optimizer's per-table hyper-parameters (lr, ...) live in the trainer state.
_SPARSE_HYPERPARAMETERS_KEY = "sparse_optimizer_hyperparameters"


class SparseStrategy(DDPStrategy):
    """Shards the LightningModule's TorchRec embedding tables and fuses their optimizer into backward.

    Dense modules stay under DDP and are trained by whatever ``configure_optimizers`` returns (the
    embedding weights are removed from those optimizers). Embedding tables are trained by the sparse
    optimizer configured here, per table if wanted.

    Args:
        sharding: default sharding of every table (``auto`` lets TorchRec's planner choose among fused types).
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
        on_signal: what a SIGTERM/SIGINT to any rank does: every rank stops at the next step boundary
            (``stop``), after saving a checkpoint when fitting (``checkpoint_and_stop``); see ``signals.py``.
        signal_checkpoint_path: where ``checkpoint_and_stop`` saves; default ``<default_root_dir>/on_signal.ckpt``.
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
    ) -> None:
        # Accelerator, devices, cluster environment, precision and checkpoint IO are filled in by the
        # Trainer (as for any registered strategy), which keeps this signature to what a YAML config sets.
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method)
        self.sharding = ShardingType.parse(sharding, "SparseStrategy.sharding")
        self.sparse_optimizer_config = optimizer or SparseOptimizerConfig()
        self.table_configs = {name: _as_table_config(name, cfg) for name, cfg in (tables or {}).items()}
        self.static_graph = static_graph
        self.find_unused_parameters = find_unused_parameters
        self._dmp: Optional[DistributedModelParallel] = None
        self._sparse_optimizer: Optional[KeyedOptimizer] = None
        self._loaded_sparse_optimizer_state: Optional[dict[str, Any]] = None
        self._loaded_sparse_hyperparameters: Optional[dict[str, dict[str, Any]]] = None
        self._tables: Optional[EmbeddingTables] = None
        self._dynamic: Optional[DynamicTables] = None
        self._dynamic_target_cache: Optional[tuple[dict[str, Any], dict[str, list[Any]]]] = None
        self._cache: Optional[CachedTables] = None
        self.bad_ids = BadIdPolicy.parse(bad_ids, "SparseStrategy.bad_ids")
        self.non_finite = NonFinitePolicy.parse(non_finite, "SparseStrategy.non_finite")
        self._input_checks: Optional[InputChecks] = None
        self.on_signal = OnSignal.parse(on_signal, "SparseStrategy.on_signal")
        self.signal_checkpoint_path = signal_checkpoint_path
        self._stop_request = StopRequest()

    # ------------------------------------------------------------------ setup
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Checkpoints hold sharded tensors: they can only be read into the sharded model.
        return True

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
        self._dmp = self._shard(self.lightning_module)
        self.model = self._dmp
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: LightningModule) -> DistributedModelParallel:
        """Plans and shards ``module`` once; later stages and Trainers reuse the same DMP."""
        existing = getattr(module, _DMP_ATTRIBUTE, None)
        if existing is not None:
            self._tables = getattr(module, _TABLES_ATTRIBUTE)
            self._dynamic = getattr(module, _DYNAMIC_ATTRIBUTE)
            self._cache = getattr(module, _CACHE_ATTRIBUTE, None)
            self._sparse_optimizer = self._build_sparse_optimizer(existing)
            return existing
        process_group = dist.group.WORLD
        self._cache = CachedTables.prepare(module, self.table_configs)  # scratchpads replace cached tables
        dmp, tables, plan = shard_tables(
            module,
            self.root_device,
            process_group,
            self.sharding,
            self.sparse_optimizer_config,
            self.table_configs,
            local_world_size=self.num_processes,
            static_graph=self.static_graph,
            find_unused_parameters=self.find_unused_parameters,
        )
        device = self.root_device
        object.__setattr__(module, _DMP_ATTRIBUTE, dmp)
        object.__setattr__(module, _TABLES_ATTRIBUTE, tables)
        self._tables = tables
        self._dynamic = dynamic_tables_of(tables, plan, dist.get_rank(process_group))
        if self._dynamic is not None:
            self._dynamic.place_partitions(device)
        object.__setattr__(module, _DYNAMIC_ATTRIBUTE, self._dynamic)
        self._sparse_optimizer = self._build_sparse_optimizer(dmp)
        if self._cache is not None:
            native = dict(self._sparse_optimizer.optimizers)["native_kernels"]
            self._cache.bind(tables, native, table_owners(dmp, list(self._cache.configs)), self.global_rank, device)
        object.__setattr__(module, _CACHE_ATTRIBUTE, self._cache)
        return dmp

    def _build_sparse_optimizer(self, dmp: DistributedModelParallel) -> KeyedOptimizer:
        """One KeyedOptimizer over every table: fbgemm's fused optimizers (``fused`` route) and our kernels'
        optimizer (``native`` and ``data_parallel`` routes). Built once per DMP."""
        existing = getattr(dmp, "_lightning_sparse_optimizer", None)
        if existing is not None:
            return existing
        optimizers: list[Union[KeyedOptimizer, tuple[str, KeyedOptimizer]]] = [("fused", dmp.fused_optimizer)]
        ours = [t for t in self._tables.tables.values() if t.route is not TableRoute.FUSED]
        if ours:
            gradients, rows = attach_row_captures(dmp, self._tables.tables)
            native = [t.name for t in ours if t.route is TableRoute.NATIVE]
            kernels = NativeKernelOptimizer(
                ours,
                embedding_parameters(self.lightning_module),
                gradients,
                rows,
                table_owners(dmp, native),
                self.global_rank,
                self._unite_rows,
                self.root_device,
            )
            optimizers.append(("native_kernels", kernels))
        combined = CombinedOptimizer(optimizers)
        object.__setattr__(dmp, "_lightning_sparse_optimizer", combined)
        return combined

    def _unite_rows(self, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The rows any rank read of a data-parallel table of ``num_rows`` rows (one all-reduce of a mask)."""
        if self.world_size == 1:
            return rows
        device = collective_device()
        mask = torch.zeros(num_rows, dtype=torch.int32, device=device)
        mask[rows.to(device)] = 1
        dist.all_reduce(mask)
        return mask.nonzero().squeeze(1).to(rows.device)

    def process_dataloader(self, dataloader: object) -> object:
        """With cached tables, the train loader is read ``lookahead`` batches ahead (``cache/prefetch.py``)."""
        trainer = self.lightning_module.trainer if self._lightning_module is not None else None
        if self._cache is None or trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        ahead = max(config.lookahead for config in self._cache.configs.values())
        return LookaheadLoader(dataloader, ahead, self._cache.new_pass, self._cache.on_batch_read)

    @property
    def cached_tables(self) -> Optional[CachedTables]:
        """The model's cached tables (None when it has none)."""
        return self._cache

    def setup_optimizers(self, trainer: Trainer) -> None:
        """Builds the user's (dense) optimizers, then removes the embedding weights from them."""
        super().setup_optimizers(trainer)
        owned_by_sparse = {id(p) for p in embedding_parameters(self.lightning_module).values()}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in owned_by_sparse]

    # ------------------------------------------------------------- training
    @property
    def sparse_optimizer(self) -> KeyedOptimizer:
        """The optimizer of every embedding table (see ``_build_sparse_optimizer``); its state is checkpointed."""
        if self._sparse_optimizer is None:
            raise RuntimeError("SparseStrategy.sparse_optimizer is available after the Trainer has set up the model.")
        return self._sparse_optimizer

    @property
    def distributed_model(self) -> DistributedModelParallel:
        """The DistributedModelParallel wrapping the LightningModule (kept across stages)."""
        if self._dmp is None:
            raise RuntimeError("SparseStrategy.distributed_model is available after the Trainer has set up the model.")
        return self._dmp

    @property
    def embedding_tables(self) -> EmbeddingTables:
        return self._tables

    def all_reduce_bytes(self, value: int) -> int:
        """Sum of an integer over all ranks (e.g. bytes of local shards), or the value without a process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return value
        total = torch.tensor([value], dtype=torch.int64, device=collective_device())  # nccl refuses CPU tensors
        dist.all_reduce(total)
        return int(total.item())

    def set_sparse_lr(self, lr: float) -> None:
        """Sets the learning rate of every embedding table (applied from the next step, checkpointed)."""
        if lr < 0:
            raise ValueError(f"sparse learning rate must be >= 0, got {lr}")
        for group in self.sparse_param_groups():
            group["lr"] = lr
        self._push_fused_learning_rates()

    def sparse_param_groups(self) -> list[dict[str, Any]]:
        """The param groups that hold the tables' hyper-parameters (lr, eps, ...), one or more per table.

        The fused groups of native-route tables are left out: their fbgemm kernel only looks rows up (lr 0);
        the table's real hyper-parameters live in our kernels' optimizer group.
        """
        native = {id(p) for p in self._route_parameters(TableRoute.NATIVE)}
        groups = []
        for name, sub in self.sparse_optimizer.optimizers:
            for group in sub.param_groups:
                if name == "native_kernels" or not any(id(p) in native for p in group["params"]):
                    groups.append(group)
        return groups

    def _route_parameters(self, route: TableRoute) -> list[nn.Parameter]:
        parameters = embedding_parameters(self.lightning_module)
        return [parameters[t.param_path] for t in self.embedding_tables.tables.values() if t.route is route]

    def _push_fused_learning_rates(self) -> None:
        # fbgemm kernels read the learning rate from their own field; TorchRec copies it there on zero_grad().
        self.distributed_model.fused_optimizer.zero_grad()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._push_fused_learning_rates()
        args = self._checked(args, training=True)
        if self._dynamic is not None:
            args = (self._remap_for_training(args[0]),) + args[1:]
        if self._cache is not None:
            args = (self._cache.before_training_step(args[0]),) + args[1:]
            for key, value in self._cache.metrics().items():
                self.lightning_module.log(key, value, on_step=True, on_epoch=False)
        return super().training_step(*args, **kwargs)

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
        return self._dynamic

    def _remap_for_training(self, batch: Any) -> Any:
        step = self.lightning_module.trainer.global_step
        assigned_rows: dict[str, torch.Tensor] = {}

        def remap(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
            remapped, assigned = self._dynamic.remap_for_training(kjt, step)
            assigned_rows.update(assigned)
            return remapped

        batch = apply_to_collection(batch, KeyedJaggedTensor, remap)
        weights, states = self._dynamic_targets()
        self._dynamic.recycle_rows(assigned_rows, weights, states, step)
        return batch

    def _remap_for_evaluation(self, args: tuple) -> tuple:
        if self._dynamic is not None and args:
            args = (apply_to_collection(args[0], KeyedJaggedTensor, self._dynamic.remap_for_evaluation),) + args[1:]
        if self._cache is not None and args:
            args = (self._cache.before_evaluation_step(args[0]),) + args[1:]
        return args

    def _dynamic_targets(self) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """Each dynamic table's weight and optimizer state tensors (local shards are views of the live ones)."""
        if self._dynamic_target_cache is None:
            tables = set(self._dynamic.configs)
            weights = {}
            for key, value in self.lightning_module.state_dict(keep_vars=True).items():
                parts = key.split(".")
                if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in tables:
                    weights[parts[-2]] = value
            states: dict[str, list[Any]] = {}
            for key, state in self.sparse_optimizer.state_dict()["state"].items():
                parts = key.split(".")
                if len(parts) >= 2 and parts[-2] in tables:
                    states.setdefault(parts[-2], []).extend(v for v in state.values() if hasattr(v, "dim"))
            self._dynamic_target_cache = (weights, states)
        return self._dynamic_target_cache

    def _dynamic_tables_state(self) -> dict[str, Any]:
        """The dynamic tables' hash tables and the cached tables' backing stores (dirty slots written back)."""
        state = self._dynamic.state_dict() if self._dynamic is not None else {}
        if self._cache is not None:
            owners = table_owners(self.distributed_model, list(self._cache.configs))
            state.update({_CACHE_PREFIX + k: v for k, v in self._cache.state_dict(owners, self.global_rank).items()})
        return state

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
        for name, keyed in self.sparse_optimizer.optimizers:
            if name != "fused":  # fbgemm's fused optimizers already ran inside backward
                keyed.step()
                keyed.zero_grad()
        return output

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        """Writes a sharded checkpoint directory; must run on every rank (Lightning calls it on all)."""
        if storage_options is not None:
            raise TypeError("SparseStrategy.save_checkpoint does not take storage_options")
        trainer_state = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        trainer_state[_SPARSE_HYPERPARAMETERS_KEY] = self._gather_sparse_hyperparameters()
        sharded_checkpoint.save_sharded(
            filepath,
            model_state=checkpoint["state_dict"],
            sparse_optimizer_state=self.sparse_optimizer.state_dict(),
            dynamic_tables_state=self._dynamic_tables_state(),
            trainer_state=trainer_state,
            is_global_zero=self.is_global_zero,
        )

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        model_state = self.lightning_module.state_dict()
        sparse_state = self.sparse_optimizer.state_dict()
        dynamic_state = self._dynamic_tables_state()
        trainer_state = sharded_checkpoint.load_sharded(checkpoint_path, model_state, sparse_state, dynamic_state)
        if self._dynamic is not None:
            self._dynamic.load_state_dict({k: v for k, v in dynamic_state.items() if not k.startswith(_CACHE_PREFIX)})
        if self._cache is not None:
            self._cache.after_load()  # the backing stores were read in place
        trainer_state["state_dict"] = model_state
        self._loaded_sparse_optimizer_state = sparse_state
        self._loaded_sparse_hyperparameters = trainer_state.pop(_SPARSE_HYPERPARAMETERS_KEY, None)
        return trainer_state

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # load_checkpoint already read the tensors in place; this re-applies them through the modules'
        # own load hooks (which keep TorchRec's sharded views consistent).
        self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if self._loaded_sparse_optimizer_state is not None:
            self.sparse_optimizer.load_state_dict(self._loaded_sparse_optimizer_state)
            self._loaded_sparse_optimizer_state = None
        if self._loaded_sparse_hyperparameters:
            self._apply_sparse_hyperparameters(self._loaded_sparse_hyperparameters)
            self._loaded_sparse_hyperparameters = None
        self._push_fused_learning_rates()

    def _gather_sparse_hyperparameters(self) -> dict[str, dict[str, Any]]:
        """Hyper-parameters (lr, eps, ...) of every table's sparse optimizer group, keyed by parameter FQN.

        Param groups differ per rank (each holds its own shards' kernels), so they are gathered from all
        ranks and stored by table, which also makes them independent of the sharding (resharding-safe).
        """
        optimizer = self.sparse_optimizer
        key_of = {id(param): key for key, param in optimizer.params.items()}
        local = {
            key_of[id(param)]: {k: v for k, v in group.items() if k != "params"}
            for group in optimizer.param_groups
            for param in group["params"]
        }
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        gathered: list[Optional[dict[str, dict[str, Any]]]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        merged: dict[str, dict[str, Any]] = {}
        for part in gathered:
            merged.update(part or {})
        return merged

    def _apply_sparse_hyperparameters(self, hyperparameters: Mapping[str, Mapping[str, Any]]) -> None:
        optimizer = self.sparse_optimizer
        key_of = {id(param): key for key, param in optimizer.params.items()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                saved = hyperparameters.get(key_of[id(param)])
                if saved is not None:
                    group.update({k: v for k, v in saved.items() if k in group})
                    break

    def remove_checkpoint(self, filepath: _PATH) -> None:
        """Deletes a checkpoint directory (ModelCheckpoint's old top-k) so that a removal cut short never
        leaves a directory that passes for a checkpoint."""
        if self.is_global_zero:
            sharded_checkpoint.remove_sharded(filepath)

    # -------------------------------------------------------------- teardown
    def teardown(self) -> None:
        """Unwraps ``self.model`` as Lightning expects; the module keeps its sharded tables (and the DMP
        reference) so a later ``trainer.test`` or another Trainer reuses them."""
        self.model = self.lightning_module
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
            self._launcher = SparseScriptLauncher(
                self._stop_request, self.cluster_environment, self.num_processes, self.num_nodes
            )

    def _install_stop_handling(self, trainer: Trainer) -> None:
        """Replaces Lightning's signal connector (whose SIGTERM handler runs a collective) by flag-only
        handlers, and adds the callback where the ranks agree to stop (see signals.py). Runs in ``setup``:
        the trainer registers its signal handlers right after."""
        if not isinstance(trainer._signal_connector, SignalConnector):
            trainer._signal_connector = SignalConnector(trainer, self._stop_request)
        if not any(isinstance(c, StopAtStepBoundary) for c in trainer.callbacks):
            trainer.callbacks.append(StopAtStepBoundary(self._stop_request, self.on_signal, self.signal_checkpoint_path))

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
