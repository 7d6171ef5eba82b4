"""CUDA graphs of the training micro-step, one per packed length (bucket).

A short-row step of gpt-oss is host-bound: thousands of kernel launches, each cheap on the GPU.
Since a packed micro-batch's shapes depend on its bucket alone (:mod:`mxlora.engine.packing`),
forward, loss and backward of one micro-batch can be captured once per bucket into a
``torch.cuda.CUDAGraph`` and replayed: one launch instead of thousands.

:class:`GraphedSteps` keeps, per bucket, static input buffers (:class:`StepInputs`) and the
graph. Only buckets the run trains at least :data:`MIN_USES` times are captured
(:func:`worth_capturing`; the plan is known in advance): a capture costs about one eager
micro-step of host time and each replay saves about one, so a bucket met once or twice (the
longest batches of an epoch, typically) runs eagerly. The run's first micro-batch runs eagerly
on its bucket's buffers (the warm-up PyTorch's docs prescribe before a capture: libraries'
lazy initialisation, the gradients' first accumulation; its result is the real one), then the
same call is captured (capture runs nothing). Once that warm-up is done, a new bucket's first
micro-batch is captured straight away and replayed: an eager run first would cost the host
time of a whole micro-step again (about a third of a second on gpt-oss-20b) for nothing a
replay does not do. Should such a capture fail (something still initialising lazily at the
new shapes), the bucket falls back to the eager run and a second capture. Later micro-batches
of a bucket are copied into its buffers (``copy_``) and the graph is replayed.

The plan is known in advance, so a new bucket is best captured one micro-step early
(:meth:`GraphedSteps.ahead`): a capture is host work only (recording; nothing runs), and done
while the device still runs the micro-step before it (before the caller's sync), it costs that
micro-step's device time less. Captures therefore skip ``torch.cuda.graph``'s device sync and
cache emptying (:meth:`GraphedSteps._capture`). Rules the caller keeps:

- everything runs on one side stream (:attr:`GraphedSteps.stream`): warm-up and capture must not
  use the default stream, and one stream keeps the caching allocator from splitting memory;
- the trainable parameters' ``.grad`` exist before the first call and are zeroed in place
  (``zero_grad(set_to_none=False)``): the captured backward accumulates into those tensors;
- no host sync inside the step (a ``.item()`` or ``.tolist()`` there fails the capture); the
  caller reads the losses after the replays;
- autocast runs with ``cache_enabled=False`` (a cast cached in one capture must not leak into the
  next).

All buckets' graphs share one memory pool: a graph's memory holds only temporaries (inputs,
gradients and the loss live outside it), so graphs run one after another can reuse it.

On the CPU (tests) the same bookkeeping runs with eager calls in place of replays.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

import torch

from mxlora.engine.packing import PackedBatch
from mxlora.engine.run_folder import TrainingError

# The tensors of a packed micro-batch, copied into a captured bucket's static buffers.
FIELDS = ("input_ids", "position_ids", "doc_ids", "loss_positions", "loss_targets", "cu_seqlens")

# A packed length is captured when the run trains it at least this often (module docstring).
MIN_USES = 3


def worth_capturing(lengths: Iterable[int]) -> set[int]:
    """The packed lengths among the run's micro-batch ``lengths`` met :data:`MIN_USES` times or
    more."""
    return {length for length, uses in Counter(lengths).items() if uses >= MIN_USES}


@dataclass
class StepInputs:
    """What one micro-step reads, on the device.

    Attributes:
        batch: the packed micro-batch (its tensors; ``tokens``/``rows`` are host bookkeeping).
        weight: 0-dim fp32, this process's weight for the micro-batch (1, or 0 for a rank's
            stand-in row).
        items: 0-dim fp32, the optimizer step's assistant-token count (the loss's divisor).
    """

    batch: PackedBatch
    weight: torch.Tensor
    items: torch.Tensor

    @classmethod
    def create(
        cls, batch: PackedBatch, weight: float, items: int, device: torch.device
    ) -> StepInputs:
        """Fresh device tensors holding ``batch``, ``weight`` and ``items``."""
        scalar = {"dtype": torch.float32, "device": device}
        return cls(
            batch.to(device),
            torch.full((), float(weight), **scalar),
            torch.full((), float(items), **scalar),
        )

    @classmethod
    def shaped_like(cls, batch: PackedBatch, device: torch.device) -> StepInputs:
        """Device buffers of ``batch``'s shapes, their values unset (a capture reads none;
        :meth:`fill` sets them before a replay). No copy from the host: one from pageable
        memory may wait for the work queued on the stream."""
        empty = {n: torch.empty_like(getattr(batch, n), device=device) for n in FIELDS}
        scalar = {"dtype": torch.float32, "device": device}
        return cls(
            dataclasses.replace(batch, **empty),
            torch.empty((), **scalar),
            torch.empty((), **scalar),
        )

    def fits(self, batch: PackedBatch) -> bool:
        """Whether ``batch`` has these buffers' shapes (the packed length and the row count)."""
        return all(getattr(self.batch, n).shape == getattr(batch, n).shape for n in FIELDS)

    def fill(self, batch: PackedBatch, weight: float, items: int) -> None:
        """Copy a micro-batch of the same shapes (:meth:`fits`) into these buffers (in place)."""
        mine = self.batch
        for name in FIELDS:
            getattr(mine, name).copy_(getattr(batch, name), non_blocking=True)
        mine.tokens, mine.rows = batch.tokens, batch.rows
        self.weight.fill_(float(weight))
        self.items.fill_(float(items))


@dataclass
class _Bucket:
    inputs: StepInputs
    loss: torch.Tensor  # the captured step writes its loss here
    graph: torch.cuda.CUDAGraph | None  # None on the CPU


class GraphedSteps:
    """Forward + loss + backward of a micro-batch, captured and replayed per packed length.

    Args:
        step: runs one micro-step on :class:`StepInputs` (backward included) and returns its
            loss, detached; no host sync inside.
        device: the training device; on a CPU device nothing is captured (the replays are
            eager calls on the same static buffers, for tests).
        lengths: the packed lengths to capture (:func:`worth_capturing`); others run eagerly.
    """

    def __init__(
        self,
        step: Callable[[StepInputs], torch.Tensor],
        device: torch.device,
        lengths: Collection[int],
    ) -> None:
        self.step = step
        self.device = device
        self.lengths = set(lengths)
        self.buckets: dict[int, _Bucket] = {}
        self.cuda = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.replays = 0
        #: Whether an eager micro-step has run (the warm-up a capture needs; module docstring).
        self.warm = False
        #: Buckets captured without an eager run of their own first.
        self.captured_cold = 0
        #: Of those, buckets captured by :meth:`ahead`, before their first micro-batch's turn.
        self.captured_ahead = 0
        #: Buckets whose capture without an eager run failed: the eager run and capture next.
        self.refused: set[int] = set()

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Run the caller's work (every step, eager and replayed) on :attr:`stream`, ordered
        after what the current stream queued before and before what it queues after."""
        if self.stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    def __call__(self, batch: PackedBatch, weight: float, items: int) -> torch.Tensor:
        """The micro-step on ``batch`` (host tensors); its loss, a tensor of its own."""
        bucket = self.buckets.get(batch.length)
        if batch.length not in self.lengths or (bucket and not bucket.inputs.fits(batch)):
            # Not captured: a rare length, or fewer rows than the capture had (a last step).
            self.warm = True
            return self.step(StepInputs.create(batch, weight, items, self.device))
        if bucket is None:
            inputs = StepInputs.create(batch, weight, items, self.device)
            if not self._may_capture_cold(batch.length) or not self._capture_cold(
                batch.length, inputs
            ):
                return self._first(batch.length, inputs)
            bucket = self.buckets[batch.length]
        else:
            bucket.inputs.fill(batch, weight, items)
        self.replays += 1
        if bucket.graph is None:
            bucket.loss.copy_(self.step(bucket.inputs))
        else:
            bucket.graph.replay()
        return bucket.loss.clone()  # the next replay overwrites the static one

    def ahead(self, batch: PackedBatch) -> None:
        """Capture the bucket of ``batch``, a micro-batch of a step still to come, now if it is
        to be captured, new, and the run warm (else nothing): called while the device still
        runs the queued work of the step before (module docstring). Its buffers are filled
        when the micro-batch's turn comes."""
        length = batch.length
        if length in self.lengths and length not in self.buckets and self._may_capture_cold(length):
            inputs = StepInputs.shaped_like(batch, self.device)
            self.captured_ahead += self._capture_cold(length, inputs)

    def _may_capture_cold(self, length: int) -> bool:
        return self.warm and length not in self.refused

    def _capture(self, inputs: StepInputs, loss: torch.Tensor) -> torch.cuda.CUDAGraph | None:
        """The micro-step on ``inputs`` captured, writing its loss into ``loss`` (None on the
        CPU, where nothing is captured).

        ``torch.cuda.graph`` would first sync the device and empty the allocator's cache: the
        sync would wait for the work queued before (which a capture may overlap: it neither
        reads nor writes memory until replayed, and the replays keep stream order), the
        emptying would hand cached memory back to the driver, to be allocated again."""
        if not self.cuda:
            return None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                loss.copy_(self.step(inputs))
            finally:
                graph.capture_end()
        return graph

    def _capture_cold(self, length: int, inputs: StepInputs) -> bool:
        """Capture a new bucket without an eager run first (the run is warm); False where the
        capture fails, nothing run and nothing kept."""
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        try:
            graph = self._capture(inputs, loss)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            self.refused.add(length)
            return False
        self.buckets[length] = _Bucket(inputs, loss, graph)
        self.captured_cold += 1
        return True

    def _first(self, length: int, inputs: StepInputs) -> torch.Tensor:
        """Run a new bucket's first micro-batch eagerly on its static buffers, then capture."""
        loss = self.step(inputs)
        self.warm = True
        static_loss = torch.empty_like(loss)
        try:
            graph = self._capture(inputs, static_loss)
        except RuntimeError as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise TrainingError(
                f"train.cuda_graphs: capturing the micro-step of packed length "
                f"{length} failed ({type(e).__name__}: {first}); set "
                f"train.cuda_graphs=false to train without CUDA graphs"
            ) from e
        self.buckets[length] = _Bucket(inputs, static_loss, graph)
        return loss
