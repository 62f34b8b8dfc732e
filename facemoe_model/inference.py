"""Running a model for inference: the eval-mode guard and the one forward-pass loop.

:func:`run_batches` is what every evaluation and analysis calls to push batches through a
model: eval mode for the duration (every module's train/eval flag restored afterwards),
``torch.inference_mode`` around each forward pass unless ``grad=True``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .moe import sample_keys

__all__ = ["eval_mode", "model_device", "run_batches"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block; every submodule's training flag is restored after (also on errors)."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def run_batches(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    grad: bool = False,
    device: torch.device | str | None = None,
    keys: Iterable[torch.Tensor | None] | None = None,
    with_inputs: bool = False,
) -> Iterator[Any]:
    """Run ``model`` on each batch of model inputs and yield its outputs, batch by batch.

    The model is in eval mode while the generator runs; every module's flag is restored when it
    is exhausted or closed (use ``contextlib.closing`` when stopping early). Each batch is moved
    to ``device`` (default: the model's).

    Args:
        grad: False — each forward pass runs under ``torch.inference_mode`` (outputs carry no
            graph); True — no inference mode and the inputs require grad: a batch that already
            requires grad (e.g. ``normalise(x01)`` of a leaf ``x01``) is used as it is, any other
            is made a leaf with ``requires_grad_`` (moved or copied ones: take them with
            ``with_inputs``).
        keys: optional, parallel to ``batches``: each image's random-routing key
            (:func:`facemoe_model.moe.sample_keys`); None for a batch keeps the running count.
        with_inputs: yield ``(inputs, outputs)`` with the device inputs the model saw.
    """
    device = torch.device(device) if device is not None else model_device(model)
    key_iter = iter(keys) if keys is not None else None
    with eval_mode(model):
        for inputs in batches:
            inputs = inputs.to(device)
            batch_keys = next(key_iter) if key_iter is not None else None
            if grad:
                if inputs.is_inference():
                    inputs = inputs.clone()
                if not inputs.requires_grad:  # a tensor that already requires grad keeps its graph
                    inputs.requires_grad_(True)
                forward = contextlib.nullcontext()
            else:
                forward = torch.inference_mode()
            with forward, sample_keys(model, batch_keys):
                outputs = model(inputs)
            yield (inputs, outputs) if with_inputs else outputs
