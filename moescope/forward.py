"""Forward passes with routing and feature capture: the one loop every analysis runs.

:func:`forward_passes` pushes each batch through one or more models (the same inputs to
each, e.g. two checkpoints being compared) with :func:`facemoe_model.inference.run_batches`
— eval mode for the duration, every module's train/eval flag restored afterwards, also on
errors — and hands back, per batch and model, the outputs, each MoE layer's routing
(:class:`~moescope.trace.RoutingTrace`) and, when asked, per-image layer features
(:class:`~moescope.features.FeatureCapture`). Hooks are always removed.

``prefetch=N`` prepares the next ``N`` batches (decoding, landmarks, region masks: whatever
produces them) in a background thread while the models run; use it only when the batches do not
depend on the results of earlier ones.

``grad=False`` (default) runs every forward pass under ``torch.inference_mode``. ``grad=True``
is the gradient path (activation maps, attacks): no inference mode, the inputs require grad
(a batch that already does — e.g. ``normalise(x01)`` of a leaf ``x01`` — is used as it is,
shared by all models), and the outputs carry the graph; captured features stay detached
unless ``keep_graph`` is set. Routing records are numpy, never part of a graph.

:func:`evaluate_model` is the same for the face-recognition protocols (``eval``, ``ablate``):
the protocols' figures, optionally with the expert usage observed while they ran.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from facemoe_model.hooks import ExpertUsage
from facemoe_model.inference import run_batches
from facemoe_model.protocols import Degradation, EvaluationData, evaluate

from .choices import EVAL_BATCH_SIZE
from .features import FeatureCapture
from .stats.cka import FeatureMode
from .trace import LayerRouting, RoutingTrace

__all__ = ["Accumulator", "ModelPass", "Step", "Evaluation", "forward_passes", "evaluate_model", "numpy_blas_threads",
           "prefetched", "release_free_memory"]


@dataclass
class ModelPass:
    """One model's forward pass over one batch."""

    inputs: torch.Tensor
    outputs: Any
    routing: dict[str, LayerRouting] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Step:
    """One batch (as given) and each model's pass over it, in the order of the models."""

    batch: Any
    passes: list[ModelPass]


def _images(batch: Any) -> torch.Tensor:
    """The model input of a batch: a tensor, or an object with an ``images`` tensor (an ImageBatch)."""
    return batch if isinstance(batch, torch.Tensor) else batch.images


BACKGROUND_NICENESS = 10
"""How much lower the scheduling priority of the background threads (batch preparation,
accumulation) is than the model's: on a machine with few cores the model's thread, which sets
the pace, keeps its core (Linux: per-thread niceness; elsewhere a no-op)."""


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority by :data:`BACKGROUND_NICENESS` (Linux only)."""
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICENESS)
    except OSError:
        pass


def prefetched(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """The items of ``items``, produced up to ``depth`` ahead in a background thread (in order).

    An exception raised while producing is raised here, at the item it replaced. Closing the
    iterator (or leaving the loop) stops the producer after the item it is working on and closes
    ``items`` (so its own clean-up runs); the thread is joined before this generator finishes.
    """
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(message) -> bool:
        while not stop.is_set():
            try:
                slots.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        _lower_priority()
        iterator = iter(items)
        try:
            for item in iterator:
                if not put((True, item)):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="moescope-prefetch", daemon=True)
    thread.start()
    interrupted = False
    try:
        while True:
            message = slots.get()
            if message is done:
                return
            ok, value = message
            if not ok:
                raise value
            yield value
    except KeyboardInterrupt:
        interrupted = True  # do not wait for a long item (a chunk of landmark detection): the thread is a daemon
        raise
    finally:
        stop.set()
        thread.join(timeout=1.0 if interrupted else None)


HAND_BACK_EVERY_S = 2.0
"""Seconds between two hand-backs of freed heap memory (:func:`release_free_memory`), checked
before each batch of :func:`forward_passes`. A hand-back and re-faulting the pages it returned cost
some tens of milliseconds, so a clock rather than an image count keeps that to 1-2% of the time
whatever a batch costs: a plain forward (``regions``, about 400 images between hand-backs) or an
attack's forward and backward passes (about every batch, where each batch fragments the heap the
most)."""


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc ``malloc_trim(0)``; a no-op
    elsewhere). A long analysis interleaves the model's large transient tensors with smaller
    arrays of varying size, which fragments the heap; every :data:`HAND_BACK_EVERY_S` seconds the
    free pages go back, so resident memory between batches stays near the working set. (The other
    two causes of growth are bounded at their source: oneDNN's per-shape cache,
    :data:`facemoe_model.ONEDNN_CACHE_CAPACITY`, and expert activations of a different size in every
    batch, :data:`moescope.choices.BATCH_SIZE` images per pass.)"""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_next_hand_back: float | None = None


def _hand_back_when_due() -> None:
    """Hand the free heap back if :data:`HAND_BACK_EVERY_S` have passed since the last time (one
    clock across :func:`forward_passes` calls: attack and degrade make one call per batch)."""
    global _next_hand_back
    now = time.monotonic()
    if _next_hand_back is not None and now >= _next_hand_back:
        release_free_memory()
        now = time.monotonic()
    if _next_hand_back is None or now >= _next_hand_back:
        _next_hand_back = now + HAND_BACK_EVERY_S


@functools.cache
def _numpy_blas():
    """threadpoolctl's controller of the BLAS libraries loaded beside torch's (numpy's OpenBLAS)."""
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    paths = [lib.filepath for lib in controller.lib_controllers
             if lib.user_api == "blas" and "torch" not in Path(lib.filepath).parts]
    return controller.select(filepath=paths)


def numpy_blas_threads(limit: int = 1):
    """Context manager: numpy's BLAS runs on at most ``limit`` threads inside the block, restored
    afterwards (torch's threads are left alone). :func:`forward_passes` holds it at 1: beside the
    model, numpy only does bookkeeping (counts, null tables), and OpenBLAS's pool, whose idle
    threads spin for a while after each call, otherwise took a core from the model (regions, 1,600
    faces: 3.8 CPU-seconds of spinning against a 7-second forward on 2 cores)."""
    return _numpy_blas().limit(limits=limit)


class Accumulator:
    """Work handed off to one background thread, in order (e.g. updating streaming counts with
    each batch's routing while the model runs the next batch): :meth:`submit` queues a call,
    at most ``depth`` waiting (the caller blocks beyond that, so memory stays bounded).

    Use as a context manager: leaving the block normally waits for every queued call and raises
    the first exception one of them raised; leaving it with an exception drops what is queued.
    The calls run one after another in submission order, so what they accumulate is the same as
    calling them in the caller's thread. ``depth=0`` runs each call at once in the caller's thread.
    """

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Accumulator":
        if self.depth > 0:
            self._thread = threading.Thread(target=self._work, name="moescope-accumulate", daemon=True)
            self._thread.start()
        return self

    def _work(self) -> None:
        _lower_priority()
        while True:
            call = self._queue.get()
            if call is None:
                return
            if self._error is None:
                try:
                    call()
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc

    def submit(self, call) -> None:
        """Queue ``call()`` (raises at once if an earlier call failed)."""
        if self._error is not None:
            raise self._error
        if self._thread is None:
            call()
        else:
            self._queue.put(call)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is None:
            return
        if exc_type is not None:
            self._error = self._error or exc  # skip what is still queued
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


def forward_passes(
    models: Sequence[nn.Module],
    batches: Iterable[Any],
    *,
    routing: bool = True,
    layers: Iterable[str] | None = None,
    features: Sequence[str] | None = None,
    feature_mode: FeatureMode = "flatten",
    grad: bool = False,
    keep_graph: bool = False,
    prefetch: int = 0,
) -> Iterator[Step]:
    """Run every model on every batch; yield a :class:`Step` per batch.

    Args:
        models: the models, each fed the same inputs (on its own device).
        batches: model inputs ``[B, 3, S, S]``, or objects with such an ``images`` attribute.
        routing: record the MoE layers' routing (``layers``: names or prefixes; default all).
        features: module names whose per-image features to capture (``feature_mode``).
        grad: the gradient path (see the module docstring); ``keep_graph`` keeps the captured
            features attached to the graph.
        prefetch: batches produced ahead in a background thread (:func:`prefetched`; 0: none).

    A generator: wrap it in ``contextlib.closing`` when stopping early, so hooks and modes are
    restored at once.
    """
    layers = list(layers) if layers is not None else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(numpy_blas_threads(1))
        traces = [stack.enter_context(RoutingTrace(m, layers)) if routing else None for m in models]
        captures = [
            stack.enter_context(FeatureCapture(m, features, feature_mode, keep_graph=keep_graph)) if features else None
            for m in models
        ]
        current: list[torch.Tensor] = []

        def feed() -> Iterator[torch.Tensor]:
            while True:
                yield current[0]

        runners = [stack.enter_context(contextlib.closing(run_batches(m, feed(), grad=grad, with_inputs=True))) for m in models]
        source = stack.enter_context(contextlib.closing(prefetched(batches, prefetch))) if prefetch > 0 else batches
        for batch in source:
            _hand_back_when_due()
            current[:] = [_images(batch)]
            passes = []
            for runner, trace, capture in zip(runners, traces, captures):
                inputs, outputs = next(runner)
                passes.append(ModelPass(inputs, outputs, trace.pop() if trace else {}, capture.pop() if capture else {}))
            yield Step(batch, passes)


@dataclass
class Evaluation:
    """The protocols' figures (``{"identification": {...}, "verification": {...}}``) and, when
    counted, the token-expert assignments ``[E]`` per MoE layer during the evaluation."""

    figures: dict[str, dict[str, float]]
    usage: dict[str, np.ndarray] | None = None


def evaluate_model(
    model: nn.Module,
    data: EvaluationData,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    flip: bool = True,
    probe_transform: Degradation | None = None,
    count_usage: bool = False,
    layers: Iterable[str] | None = None,
) -> Evaluation:
    """Every protocol of ``data`` (:func:`facemoe_model.protocols.evaluate`, the figures ``moescope
    eval`` reports); with ``count_usage``, the expert usage of ``layers`` (default all) over every
    forward pass of it (images and mirror images; grid tokens).

    Under ``torchrun`` every rank embeds its share of the images (the embeddings are gathered,
    :func:`facemoe_model.evaluate.embed_dataset`) and the usage counts are summed over the ranks."""
    from .distributed import reduce_usage

    with ExpertUsage(model, layers) if count_usage else contextlib.nullcontext() as counter:
        figures = evaluate(model, data, batch_size=batch_size, flip=flip, probe_transform=probe_transform)
    return Evaluation(figures, reduce_usage(counter.counts) if counter is not None else None)
