"""Training pipelines under SparseStrategy: ``none | sparse_dist | hybrid(S) | semi_sync``, driven from Lightning's hooks.

Lightning owns the loop (fetch, ``training_step``, backward, optimizer step, validation, checkpoints), so
TorchRec's ``progress()`` cannot be called. Instead :class:`PipelineDriver` runs TorchRec's pipeline *stages*
around the user's unchanged ``training_step``:

- the train loader is wrapped (:class:`LookaheadLoader`, from ``process_dataloader``) so the driver can read
  batches ahead of the one Lightning is on; only the main thread ever advances the loader;
- ``sparse_dist`` keeps a real :class:`~torchrec.distributed.train_pipeline.TrainPipelineSparseDist` and calls
  its stage methods in ``progress()``'s order: ``enqueue_batch`` / ``_init_pipelined_modules`` /
  ``wait_sparse_data_dist`` to fill, ``start_sparse_data_dist`` of batch i+1 before batch i's forward (in
  ``training_step``), ``wait_sparse_data_dist`` after it, ``dequeue_batch`` after the optimizer step.
  The sharded modules' forwards are TorchRec's ``PipelinedForward``: results are bit-identical to ``none``.
- ``hybrid`` (PERSIA) and ``semi_sync`` run the embedding path on one worker thread: input dist, lookup and
  output dist of a batch (TorchRec's ``_init_pipelined_modules`` / ``start_sparse_data_dist`` /
  ``wait_sparse_data_dist`` / ``compute_and_output_dist``), and later its embedding backward
  (``TrainPipelineSemiSync.embedding_backward``: fbgemm's fused update) and our kernels' row update. The
  forward reads the looked-up embeddings through TorchRec's ``CPUEmbeddingPipelinedForward``, detached, so
  the user's backward stops at them and the dense layers (DDP) stay synchronous on the main thread.
  The worker issues a batch's output dist (an asynchronous all-to-all) without waiting for it; the main thread
  waits for it when it trains that batch, so the exchanges of the batches in flight overlap each other and
  the worker's next lookups, as PERSIA's outstanding requests do. The worker runs its tasks in order, and the lookup of batch ``j`` is queued only after the update of
  batch ``j - S - 1``: a lookup misses at most ``S`` updates (PERSIA's semaphore of ``S + 1`` in-flight
  batches, expressed as queue order, which also makes runs deterministic). ``S = 0`` gives the same bits as
  ``none``; ``semi_sync`` is ``S = 1``, which is TorchRec's semi-sync staleness (its lookup of batch
  ``i + 1`` precedes batch ``i``'s embedding backward) without its ``start_batch`` warm-up.

Where TorchRec's classes could not be used as they are, and why:

- ``TrainPipelineSemiSync`` on CPU calls ``record_stream`` on a ``torch.cpu.Stream`` and creates CUDA
  events; its ``EmbeddingPipelinedForward`` defaults its device to ``cuda``. The lookup is therefore done
  here (the worker), and the forward is ``CPUEmbeddingPipelinedForward``, which only returns it.
- Real overlap on CPU needs a thread: TorchRec's stages run on the calling thread (no CUDA streams). The
  tables' collectives then run on the worker, so the tables are sharded on a process group of their own
  (:func:`embedding_process_group`) and DDP and Lightning keep the default one on the main thread.

In-flight batches at a validation, a checkpoint, the end of a pass or of fit are **drained**: the worker
finishes its queued updates, lookups of batches not trained yet are dropped (looked up again, from the
updated rows, at the next step) and the model's forwards are restored (``detach``). Every rank drains at
the same step, so a checkpoint holds no in-flight state and a resumed run repeats the saving run exactly.

Dynamic tables: a batch's ids are remapped when it enters the pipeline and its new rows re-initialised just
before its own lookup; a drain rewinds the remaps and recycles of batches not trained yet
(``pipeline_dynamic.py``). Cached tables are refused (their planner would need the pipeline's look-ahead).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline.pipeline_context import CPUEmbeddingTrainPipelineContext, TrainPipelineContext
from torchrec.distributed.train_pipeline.runtime_forwards import CPUEmbeddingPipelinedForward, PipelinedForward
from torchrec.distributed.train_pipeline.train_pipelines import TrainPipelineSemiSync, TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.utils import _rewrite_model
from torchrec.distributed.types import ShardedModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lightning_sparse.config import PipelineConfig, PipelineKind, ResolvedTable, TableRoute
from lightning_sparse.optim.row_versions import RowVersions
from lightning_sparse.strategies.pipeline_dynamic import PipelineRemaps, Remapped

STALENESS_METRIC = "pipeline/max_staleness"


def embedding_process_group(config: PipelineConfig) -> Optional[dist.ProcessGroup]:
    """A process group of their own for the tables' collectives when a worker thread runs them (every rank
    calls this at setup); None when the tables share the default group."""
    if config.kind in (PipelineKind.HYBRID, PipelineKind.SEMI_SYNC):
        return dist.new_group(backend=dist.get_backend())
    return None


def check_pipeline_setup(
    config: PipelineConfig, tables: dict[str, ResolvedTable], unsupported: dict[str, bool]
) -> None:
    """Refuses combinations a pipeline cannot train correctly, naming the table or option and the fix."""
    kind = config.kind.value
    cached = sorted(t.name for t in tables.values() if t.cache is not None)
    if cached:
        raise ValueError(
            f"SparseStrategy(pipeline={kind!r}): cached tables {cached} replace a batch's ids by scratchpad slots at the "
            "step that trains it, after a pipeline has already distributed the raw ids (and the pipeline's look-ahead "
            "would bypass the cache's); use pipeline 'none' with cached tables (TableConfig.cache)."
        )
    if config.kind in (PipelineKind.HYBRID, PipelineKind.SEMI_SYNC):
        replicated = sorted(t.name for t in tables.values() if t.route is TableRoute.DATA_PARALLEL)
        if replicated:
            raise ValueError(
                f"SparseStrategy(pipeline={kind!r}): data_parallel tables {replicated} are updated through DDP's "
                "all-reduce on the main thread, which the asynchronous embedding path cannot use; shard them "
                "table_wise or column_wise, or use pipeline 'none' or 'sparse_dist'."
            )
    for option, bad in unsupported.items():
        if bad:
            raise ValueError(
                f"SparseStrategy(pipeline={kind!r}) needs {option}: the pipeline distributes a batch's ids before its "
                "training_step, so a batch edited there would not be the one looked up."
            )


def check_traceable(dmp: DistributedModelParallel) -> None:
    """Traces the model's forward as TorchRec's pipelines do and undoes the rewrite; a forward that cannot be
    traced, or whose sharded modules take inputs computed from the batch, is an error now, not mid-fit."""
    sharded = [name for name, m in dmp.module.named_modules() if isinstance(m, ShardedModule)]
    try:
        modules, _, originals, _, not_pipelined = _rewrite_model(
            model=dmp, context=TrainPipelineContext(version=1), dist_stream=None, batch=None,
            pipelined_forward=PipelinedForward,
        )  # fmt: skip
    except Exception as error:  # torch.fx raises many types
        raise ValueError(
            f"SparseStrategy(pipeline=...): the model's forward cannot be traced by torch.fx, which TorchRec's pipelines "
            f"need to find the embedding modules' inputs ({type(error).__name__}: {error}). Make forward take the "
            "KeyedJaggedTensor and pass it to the embedding modules unchanged, or use pipeline 'none'."
        ) from error
    for module, original in zip(modules, originals):
        module.forward = original
        module.is_pipelined = False
    if not_pipelined or not modules:
        raise ValueError(
            f"SparseStrategy(pipeline=...): the embedding module(s) {not_pipelined or sharded} do not take the forward's "
            "KeyedJaggedTensor argument unchanged (their input is computed in forward), so their input cannot be "
            "distributed ahead; compute it in the data pipeline instead, or use pipeline 'none'."
        )


def _features_of(batch: Any) -> KeyedJaggedTensor:
    if isinstance(batch, Batch):  # the common case, without apply_to_collection's walk of every field
        return batch.sparse_features
    found: list[KeyedJaggedTensor] = []
    apply_to_collection(batch, KeyedJaggedTensor, found.append)
    if len(found) != 1:
        raise ValueError(
            f"SparseStrategy(pipeline=...): a training batch must hold exactly one KeyedJaggedTensor, found {len(found)}"
        )
    return found[0]


class LookaheadLoader:
    """The train loader as Lightning sees it: the same batches in the same order, read through the driver so that
    it can look ahead. Everything else (length, sampler, ``state_dict``) is the wrapped loader's."""

    def __init__(self, loader: Any, driver: "PipelineDriver") -> None:
        self.loader = loader
        self._driver = driver

    def __iter__(self) -> "LookaheadLoader":
        self._driver.start_pass(iter(self.loader))
        return self

    def __next__(self) -> Any:
        return self._driver.next_for_trainer()

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "_driver"):
            raise AttributeError(name)
        return getattr(self.loader, name)


class _Entry:
    """A batch read from the loader and not trained yet; with dynamic tables, remapped when it enters the pipeline."""

    def __init__(self, raw: Any, remaps: Optional[PipelineRemaps]) -> None:
        self.raw = raw
        self.remapped: Optional[Remapped] = None
        self._features = None if remaps is not None else _features_of(raw)

    @property
    def batch(self) -> Any:
        """The batch the model trains on (rows instead of dynamic tables' raw ids)."""
        return self.remapped.batch if self.remapped is not None else self.raw

    @property
    def features(self) -> KeyedJaggedTensor:
        if self._features is None:
            if self.remapped is None:
                raise RuntimeError("SparseStrategy pipeline: a batch's features were needed before its remap")
            self._features = _features_of(self.remapped.batch)
        return self._features

    def forget_remap(self) -> None:
        self.remapped = None
        self._features = None


class _Stages(TrainPipelineSparseDist):
    """TorchRec's sparse-dist stages; for hybrid/semi_sync the forwards return embeddings looked up by the worker."""

    embedding_backward = TrainPipelineSemiSync.embedding_backward

    def __init__(self, dmp: DistributedModelParallel, device: torch.device, precomputed: bool) -> None:
        if precomputed:
            self._pipelined_forward_type = CPUEmbeddingPipelinedForward
        super().__init__(dmp, optimizer=None, device=device)  # the optimizers are Lightning's; progress() is unused


class PipelineDriver:
    """Runs one pipeline kind's stages from SparseStrategy's hooks (see the module docstring)."""

    def __init__(
        self,
        config: PipelineConfig,
        dmp: DistributedModelParallel,
        device: torch.device,
        row_update: Callable[[], None],
        remaps: Optional[PipelineRemaps] = None,
        global_step: Callable[[], int] = lambda: 0,
    ) -> None:
        self.config = config
        self._dmp = dmp
        self._device = device
        self._row_update = row_update  # our kernels' step (native route); on the worker for hybrid
        self._asynchronous = config.kind in (PipelineKind.HYBRID, PipelineKind.SEMI_SYNC)
        self._stages = _Stages(dmp, device, precomputed=self._asynchronous)
        self._stages.detach()
        # Staleness is counted where it can be non-zero; sparse_dist and none never read a row before its update.
        self.versions = RowVersions(dmp) if self._asynchronous else None
        self.remaps = remaps  # dynamic tables (pipeline_dynamic.py), None without
        self._global_step = global_step
        self._step = 0  # the step that trains _entries[0]
        self._source: Optional[Iterator[Any]] = None
        self._entries: deque[_Entry] = deque()  # read, not trained yet (in order)
        self._recycled: list[Remapped] = []  # worker: batches looked up whose older in-flight updates are not done
        self._handed_out = 0  # how many of _entries Lightning has fetched
        self._worker: Optional[ThreadPoolExecutor] = None
        self._lookups: deque[Future] = deque()  # hybrid: one per entry from _entries[0], in order
        self._updates: deque[Future] = deque()  # hybrid: row updates queued, not yet checked for failure
        self._trained = 0  # hybrid: batches whose update is queued since the last drain
        self._current: Optional[Future] = None

    @property
    def owns_row_updates(self) -> bool:
        """Whether the driver (not the strategy's optimizer_step) applies our kernels' row updates."""
        return self._asynchronous

    @property
    def max_staleness(self) -> Optional[int]:
        """The largest staleness this rank's lookups saw (hybrid, semi_sync), None where it is not counted."""
        return self.versions.max_staleness if self.versions is not None else None

    # ------------------------------------------------------------ the loader
    def wrap(self, loader: Any) -> LookaheadLoader:
        return LookaheadLoader(loader, self)

    def start_pass(self, source: Iterator[Any]) -> None:
        self.drain()
        self._entries.clear()
        self._handed_out = 0
        self._step = self._global_step()
        self._source = source

    def _read(self) -> bool:
        if self._source is None:
            return False
        try:
            batch = next(self._source)
        except StopIteration:
            self._source = None
            return False
        self._entries.append(_Entry(batch, self.remaps))
        return True

    def _remapped(self, count: int) -> None:
        """Dynamic tables: the first ``count`` entries remapped, in order, each at the step that will train it."""
        if self.remaps is None:
            return
        for position in range(count):
            entry = self._entries[position]
            if entry.remapped is None:
                entry.remapped = self.remaps.remap(entry.raw, self._step + position)

    def trained_batch(self) -> Any:
        """The batch of the current step as the model sees it (dynamic tables' ids replaced by rows)."""
        self._remapped(1)
        return self._entries[0].batch

    def next_for_trainer(self) -> Any:
        if self._handed_out == len(self._entries) and not self._read():
            raise StopIteration
        self._handed_out += 1
        return self._entries[self._handed_out - 1].raw

    def _have(self, count: int) -> int:
        """Reads ahead until ``count`` untrained batches are known (fewer at the end of the pass)."""
        while len(self._entries) < count and self._read():
            pass
        count = min(count, len(self._entries))
        self._remapped(count)
        return count

    # ------------------------------------------------------------- the step
    def before_forward(self) -> None:
        """In ``training_step``, before the user's: batch ``_entries[0]``'s embedding input is ready."""
        if not self._entries:
            raise RuntimeError("SparseStrategy pipeline: training_step ran on a batch the pipeline did not read")
        self._have(1)
        if self._asynchronous:
            while self._updates and self._updates[0].done():
                self._updates.popleft().result()  # re-raises a failed row update
            self._schedule_lookups()
            self._current = self._lookups.popleft()
            context = self._current.result().received()  # re-raises a failure of the worker or of the exchange
            self._stages._set_module_context(context)
            return
        stages = self._stages
        if not stages.batches:  # fresh (first step, or after a drain): TorchRec's fill_pipeline
            if not stages._model_attached:
                stages.attach(self._dmp)
            stages.enqueue_batch(iter([self._entries[0].features]))
            stages._init_pipelined_modules(stages.batches[0], stages.contexts[0], stages._pipelined_forward_type)
            stages.wait_sparse_data_dist(stages.contexts[0])
        if len(stages.batches) < 2 and self._have(2) == 2:
            stages.enqueue_batch(iter([self._entries[1].features]))
        if self.remaps is not None:  # its new rows, after the update of the batch before (as without a pipeline)
            remapped = self._entries[0].remapped
            assert remapped is not None  # every entry is remapped when the pipeline has dynamic tables
            self.remaps.recycle(remapped)
        stages._set_module_context(stages.contexts[0])
        stages._wait_for_batch()  # on CUDA: this stream waits for batch i's input dist stream (a no-op on CPU)
        if len(stages.batches) >= 2:
            stages.start_sparse_data_dist(stages.batches[1], stages.contexts[1])

    def after_forward(self, module: Any) -> None:
        """In ``training_step``, after the user's: batch i+1's input dist completes (sparse_dist); logs staleness."""
        if not self._asynchronous and len(self._stages.batches) >= 2:
            self._stages.wait_sparse_data_dist(self._stages.contexts[1])
        if self.versions is not None:
            module.log(STALENESS_METRIC, float(self.versions.max_staleness), batch_size=1)

    def after_optimizer_step(self) -> None:
        """After the dense step: the batch's row update (now, or queued on the worker), then the next lookups."""
        if self._asynchronous:
            assert self._current is not None  # before_forward took this batch's lookups
            context = self._current.result().received()
            self._updates.append(self._submit(self._update, context, self._step))
            self._current = None
            self._trained += 1
            self._pop()
            self._schedule_lookups()
            return
        self._stages.dequeue_batch()
        self._pop()

    def _pop(self) -> None:
        self._entries.popleft()
        self._handed_out -= 1
        self._step += 1

    # ------------------------------------------------------- hybrid worker
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_sparse_embeddings")
        return self._worker.submit(fn, *args)

    def _schedule_lookups(self) -> None:
        """Queues lookups while the bound allows: batch ``j`` after the update of batch ``j - S - 1``."""
        assert self.config.staleness is not None  # hybrid: PipelineConfig requires it
        wanted = self._have(self.config.staleness + 1)
        while len(self._lookups) < wanted:
            index = self._trained + len(self._lookups)
            entry = self._entries[len(self._lookups)]
            self._lookups.append(self._submit(self._lookup, entry.features, entry.remapped, index))

    def _lookup(self, features: KeyedJaggedTensor, remapped: Optional[Remapped], index: int) -> "_InFlight":
        """Worker: input dist and lookup of one batch, and its output dist *issued*: the worker does not wait for
        the exchange (an asynchronous all-to-all) but goes on to the next task; the main thread waits for it
        when it trains the batch (:meth:`_InFlight.received`), so the exchanges of batches in flight overlap."""
        stages = self._stages
        if remapped is not None:  # its new rows, just before its lookup (pipeline_dynamic.py)
            assert self.remaps is not None  # a batch is remapped only when the pipeline has dynamic tables
            self.remaps.recycle(remapped)
            self._recycled.append(remapped)
        context = CPUEmbeddingTrainPipelineContext(index=index, version=1)
        features = features.to(self._device, non_blocking=True)
        if not stages._model_attached:
            stages.attach(self._dmp)
        if stages._pipelined_modules:  # not _init_pipelined_modules: the main thread owns the forwards' context
            stages.start_sparse_data_dist(features, context)
        else:  # the first lookup after attaching rewrites the forwards (the main thread waits for it)
            stages._init_pipelined_modules(features, context, stages._pipelined_forward_type)
        stages.wait_sparse_data_dist(context)
        exchanges: dict[str, Any] = {}
        for module in stages._pipelined_modules:
            name = module.forward.name
            distributed = context.input_dist_tensors_requests.pop(name).wait()
            exchanges[name] = module.compute_and_output_dist(context.module_contexts.pop(name), distributed)
        return _InFlight(context, exchanges)

    def _update(self, context: CPUEmbeddingTrainPipelineContext, step: int) -> None:
        """Worker: the batch's embedding backward (fbgemm's fused update), then our kernels' update."""
        if any(t.grad is not None for tensors in context.detached_embedding_tensors for t in tensors):
            self._stages.embedding_backward(context)
        self._row_update()
        assert self.versions is not None  # the worker runs in the asynchronous (hybrid) pipeline only
        self.versions.applied()
        if self._recycled:  # later batches' new rows: undo what this update wrote into them for evicted ids
            later = [entry for entry in self._recycled if entry.step > step]
            assert self.remaps is not None  # batches are recycled only when the pipeline has dynamic tables
            self.remaps.reapply(later)
            self._recycled = [entry for entry in later if entry.step > step + 1]  # the next batch's is final now

    # ----------------------------------------------------------------- drain
    def settle(self) -> None:
        """Waits until the worker has done everything queued (the updates of the batches trained so far)."""
        if self._worker is not None:
            self._submit(lambda: None).result()

    def drain(self, raise_failures: bool = True) -> None:
        """No batch in flight afterwards: queued updates done, lookups of untrained batches dropped, forwards restored."""
        failures: list[BaseException] = []
        if self._worker is not None:
            self.settle()
            raised = [f.exception() for f in (*self._updates, *self._lookups)]
            for lookup in self._lookups:  # no exchange left in flight: wait for those of the dropped lookups
                if lookup.exception() is None:
                    try:
                        lookup.result().received()
                    except Exception as error:
                        raised.append(error)
            failures = [error for error in raised if error is not None]
            self._lookups.clear()
            self._updates.clear()
            self._current = None
            self._trained = 0
        if self.remaps is not None:  # the hash tables and rows as after the trained batches (pipeline_dynamic.py)
            self.remaps.rewind([entry.remapped for entry in self._entries if entry.remapped is not None])
            for entry in self._entries:
                entry.forget_remap()
            self._recycled = []
        self._stages.reset()
        if self.versions is not None:
            self.versions.forget_in_flight()
        if self._stages._model_attached:
            self._stages.detach()
        if failures and raise_failures:
            raise failures[0]

    def close(self) -> None:
        """At teardown (also after a failure, which has been raised already): drain, then stop the worker."""
        self.drain(raise_failures=False)
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None


class _InFlight:
    """A batch looked up by the worker whose output dist (the all-to-all of its embeddings) was issued and may
    still be in flight; the main thread waits for it once, when it trains the batch (or when a drain drops it)."""

    def __init__(self, context: CPUEmbeddingTrainPipelineContext, exchanges: dict[str, Any]) -> None:
        self.context = context
        self._exchanges = exchanges

    def received(self) -> CPUEmbeddingTrainPipelineContext:
        """The context with the batch's embeddings (detached leaves), after waiting for its exchanges."""
        while self._exchanges:
            name, exchange = next(iter(self._exchanges.items()))
            self.context.gpu_embedding_outputs[name] = _detach_into(exchange.wait(), self.context)
            del self._exchanges[name]
        return self.context


def _detach_into(embeddings: Any, context: CPUEmbeddingTrainPipelineContext) -> Any:
    """Replaces the looked-up values by detached leaves (the user's backward fills their ``grad``), keeping the
    originals for the embedding backward; the same bookkeeping as TorchRec's ``EmbeddingPipelinedForward``."""
    if isinstance(embeddings, KeyedTensor):
        values = embeddings.values()
        detached = values.detach().requires_grad_()
        embeddings._values = detached
        context.embedding_tensors.append([values])
        context.embedding_features.append([list(embeddings.keys())])
        context.detached_embedding_tensors.append([detached])
        return embeddings
    tensors, leaves = [], []
    for jagged in embeddings.values():
        values = jagged.values()
        detached = values.detach().requires_grad_()
        jagged._values = detached
        tensors.append(values)
        leaves.append(detached)
    context.embedding_tensors.append(tensors)
    context.embedding_features.append(list(embeddings.keys()))
    context.detached_embedding_tensors.append(leaves)
    return embeddings


def build_driver(strategy: Any, trainer: Any) -> Optional[PipelineDriver]:
    """The driver of ``strategy.pipeline`` for a fit (None for ``none``), after refusing what it cannot run."""
    from lightning_sparse.validation import BadIdPolicy, NonFinitePolicy

    config = strategy.pipeline
    if config.kind is PipelineKind.NONE:
        return None
    dmp = strategy.distributed_model
    check_pipeline_setup(
        config,
        strategy.embedding_tables.tables,
        {
            "bad_ids: error (not drop)": strategy.bad_ids is not BadIdPolicy.ERROR,
            "non_finite: error (not skip)": strategy.non_finite is not NonFinitePolicy.ERROR,
            "automatic optimization (LightningModule.automatic_optimization = True)":
                not strategy.lightning_module.automatic_optimization,
        },
    )  # fmt: skip
    if config.kind in (PipelineKind.HYBRID, PipelineKind.SEMI_SYNC) and dmp._env.process_group is dist.group.WORLD:
        raise ValueError(
            f"SparseStrategy(pipeline={config.kind.value!r}): this model's tables were sharded by an earlier Trainer on "
            "the default process group, but this pipeline runs their collectives on a worker thread and needs a group "
            "of their own; build the model anew for this Trainer."
        )
    check_traceable(dmp)
    dynamic = strategy.sharded_model.dynamic
    return PipelineDriver(
        config, dmp, strategy.root_device, strategy.sharded_model.optimizer.step_kernels,
        remaps=PipelineRemaps(dynamic) if dynamic is not None else None,
        global_step=lambda: trainer.global_step,
    )  # fmt: skip
