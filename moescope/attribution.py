"""Gradient attributions of a face model's score, through captum: per-expert Grad-CAM on a
MoE layer's token grid, and input-space attributions.

Score. Face models have no class output, so the explained quantity is
:class:`CosineScore`: ``cos(model(x), reference)`` per image. The reference is the image's own
clean embedding (:func:`embed` of the clean images) or a gallery mate's. Note that with the
image's own embedding, the score of that very image is 1, its maximum, where the gradient
vanishes: Grad-CAM (a gradient at ``x``) is then ~0 everywhere. Use it on a degraded version
of the image (e.g. low resolution) against the clean embedding, or against a gallery mate;
Integrated Gradients is unaffected (it integrates gradients from the baseline up to ``x``).
``moescope maps`` (:mod:`moescope.runners.maps`) therefore never uses the self-reference: it
takes the gallery mate with evaluation data, else the mean embedding of the other analysed
images of the same identity folder, else of all other analysed images, and records which.

captum pieces used, and why:

* :class:`captum.attr.LayerGradCam` — Grad-CAM of one expert: ``ReLU(sum_c alpha_c A_c)`` with
  ``A`` the expert's weighted contribution ``w_e * expert_e(x)`` on the token grid and
  ``alpha_c`` the gradient of the score w.r.t. ``A_c`` averaged over tokens. captum assumes
  NCHW: it averages the gradient over dims 2.. and sums over dim 1. A transformer layer's
  ``[B, N, C]`` tokens would be read as N channels of length C — the result is ``[B, 1, C]``
  (a map over channels, not tokens) and ``LayerAttribution.interpolate`` then fails. So each
  expert's contribution is presented to captum as ``[B, C, rows, cols]`` (token ``n`` at
  ``divmod(n, cols)``), the output of a parameter-free :class:`~facemoe_model.moe.HookPoint`
  spliced into the graph; captum returns ``[B, 1, rows, cols]``, which
  :meth:`captum.attr.LayerAttribution.interpolate` upsamples like a CNN map.
* :class:`captum.attr.IntegratedGradients` — input attribution with completeness
  (attributions sum to ``score(x) - score(baseline)``; captum's convergence delta is the
  gap, reported per image). Gauss-Legendre quadrature, baseline = 0 in the model's normalised
  input space (a uniform mid-grey image).
* :class:`captum.attr.InputXGradient` — the cheap one-pass alternative (``x * d score / dx``),
  no completeness.

Where the contribution comes from (:class:`ExpertTap`). The MoE layer is the single source of
truth: its hook point (``hook_expert_outputs``) hands each expert's weighted per-token
contribution (``ExpertOutputs``) to observers; nothing is recomputed. The layer computes its
output apart from what the point passes on, so to differentiate w.r.t. a contribution it is
put on the path to the score: the layer's output at the grid tokens is ``sum_e A_e`` (so ``dy/dA_e`` is
the identity), and a forward hook on the layer adds ``t_e - t_e.detach()`` (exactly zero) to
its output, with ``t_e`` the HookPoint output carrying ``A_e``. The forward values are
bit-for-bit unchanged and ``d score / d t_e = d score / d A_e``. Every hook is removed on exit,
also on errors; parameters and their ``.grad`` are untouched (captum differentiates w.r.t.
inputs / the spliced tensor only).

Cost: Grad-CAM is one forward + backward pass per expert and layer; Integrated Gradients is
``n_steps`` forward + backward passes per image (plus two forward passes for the scores).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from facemoe_model.moe import HookPoint

__all__ = [
    "ExpertTap",
    "grid_contributions",
    "CosineScore",
    "embed",
    "expert_gradcam",
    "InputAttribution",
    "input_attribution",
    "INPUT_METHODS",
]

INPUT_METHODS = ("integrated_gradients", "input_x_gradient")


def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embeddings ``[B, D]`` of ``images`` (no gradient, detached): the clean reference."""
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).detach()


class CosineScore(nn.Module):
    """Per-image score ``cos(model(images), reference)`` ``[B]`` (the explained quantity).

    ``reference`` ``[B, D]`` is an argument of ``forward`` (not state), so captum's
    ``additional_forward_args`` expands it with the inputs (Integrated Gradients' steps).
    The model must be in eval mode (dropout would make the score random).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            raise ValueError("CosineScore needs the model in eval mode")
        out = self.model(images)
        if reference.shape != out.shape:
            raise ValueError(f"reference embeddings {list(reference.shape)} do not match the model's {list(out.shape)}")
        return F.cosine_similarity(out, reference.to(out.dtype), dim=-1)


def grid_contributions(outputs: Any) -> torch.Tensor:
    """A MoE layer's :class:`~facemoe_model.moe.ExpertOutputs` (contributions ``[T, E, C]``,
    tokens flattened over images) as ``[B, E, N, C]`` for the grid tokens (prefix dropped)."""
    c = outputs.contributions
    per_image = c.reshape(outputs.batch_size, c.shape[0] // outputs.batch_size, *c.shape[1:])
    return per_image[:, outputs.num_prefix_tokens :].transpose(1, 2)


@dataclass(frozen=True)
class ExpertTap:
    """Where a MoE layer's per-expert contributions are observed.

    Attributes:
        layer: the module whose output holds, at the grid tokens, ``sum_e`` of the
            contributions (the MoE layer).
        point: the hook point whose forward hooks receive the contributions.
        read: turns what ``point`` passes on into ``[B, E, N, C]``: per image, expert, grid
            token (row-major, prefix tokens dropped) the expert's weighted output (0 where it
            did not run).
        grid: ``(rows, cols)`` of the N grid tokens.
        num_experts: E.
        num_prefix_tokens: tokens before the grid in the layer's ``[B, T, C]`` output.
    """

    layer: nn.Module
    point: nn.Module
    read: Callable[[Any], torch.Tensor]
    grid: tuple[int, int]
    num_experts: int
    num_prefix_tokens: int = 0

    @classmethod
    def for_moe_layer(
        cls, layer: nn.Module, read: Callable[[Any], torch.Tensor] = grid_contributions, point: str = "hook_expert_outputs"
    ) -> "ExpertTap":
        """The tap of a :class:`~facemoe_model.moe.MoELayer`: its ``hook_expert_outputs`` point,
        read with :func:`grid_contributions` (the layer computes them only while observed)."""
        hook = getattr(layer, point, None)
        if not isinstance(hook, nn.Module):
            raise ValueError(f"this MoE layer has no {point} hook point")
        if layer.token_grid is None:
            raise ValueError("MoE layer has no token grid; set MoELayer.token_grid")
        return cls(layer, hook, read, tuple(layer.token_grid), layer.num_experts, layer.num_prefix_tokens)


class _GridSplice:
    """Hooks that put each expert's contribution on the gradient path as ``[B, C, rows, cols]``."""

    def __init__(self, tap: ExpertTap) -> None:
        self.tap = tap
        self.points = [HookPoint() for _ in range(tap.num_experts)]
        self._seen: torch.Tensor | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "_GridSplice":
        with contextlib.ExitStack() as stack:
            stack.callback(self._clear)
            stack.callback(self.tap.point.register_forward_hook(self._observe).remove)
            stack.callback(self.tap.layer.register_forward_hook(self._splice).remove)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def _clear(self) -> None:
        self._seen = None

    def _observe(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self._seen = self.tap.read(output)

    def _splice(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        contributions, self._seen = self._seen, None
        if contributions is None:
            raise RuntimeError("the layer ran without passing its expert contributions to the hook point")
        rows, cols = self.tap.grid
        b, e, n, c = contributions.shape
        if e != self.tap.num_experts or n != rows * cols:
            raise RuntimeError(f"expert contributions {list(contributions.shape)} do not match {self.tap.num_experts} experts on grid {self.tap.grid}")
        delta = None
        for expert, point in enumerate(self.points):
            t = point(contributions[:, expert].detach().transpose(1, 2).reshape(b, c, rows, cols))
            zero = t - t.detach()  # exactly 0; d/dt = identity
            delta = zero if delta is None else delta + zero
        flat = output.reshape(b, -1, c)
        p = self.tap.num_prefix_tokens
        grid_part = flat[:, p:] + delta.reshape(b, c, n).transpose(1, 2).to(flat.dtype)
        return torch.cat([flat[:, :p], grid_part], dim=1).reshape(output.shape)


@contextlib.contextmanager
def _gradients_allowed() -> Iterator[None]:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("gradient attributions cannot run under torch.inference_mode")
    with torch.enable_grad():
        yield


def expert_gradcam(
    score: Callable[..., torch.Tensor],
    images: torch.Tensor,
    tap: ExpertTap,
    *,
    args: tuple = (),
    experts: Sequence[int] | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """Grad-CAM map of each expert of one MoE layer: ``[B, len(experts), rows, cols]``.

    ``score(images, *args)`` returns one value per image (e.g. :class:`CosineScore` with
    ``args=(reference,)``). Per expert ``e``: ``ReLU(sum_c alpha_c A_e[c, token])`` with
    ``alpha_c = mean over tokens of d score / d A_e[c, token]`` (captum ``LayerGradCam``;
    ``relu=False`` keeps the sign). Zero where the expert did not run. Upsample with
    ``captum.attr.LayerAttribution.interpolate`` or :func:`moescope.stats.maps.upsample`.
    """
    from captum.attr import LayerGradCam

    chosen = list(range(tap.num_experts)) if experts is None else list(experts)
    maps = []
    with _gradients_allowed(), _GridSplice(tap) as splice:
        for e in chosen:
            cam = LayerGradCam(score, splice.points[e])
            maps.append(cam.attribute(images, additional_forward_args=tuple(args), relu_attributions=relu).detach())
    return torch.cat(maps, dim=1)


@dataclass(frozen=True)
class InputAttribution:
    """Input-space attribution of a score: ``attributions`` ``[B, 3, H, W]``, ``score`` ``[B]``
    at the images; for Integrated Gradients also ``baseline_score`` and ``delta`` (captum's
    convergence delta ``sum(attributions) - (score - baseline_score)``)."""

    method: str
    attributions: torch.Tensor
    score: torch.Tensor
    baseline_score: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    def pixel_map(self, reduce: str = "sum") -> torch.Tensor:
        """Per-pixel map ``[B, H, W]``: channel sum (signed, ``sum``) or sum of magnitudes (``abs``)."""
        if reduce == "sum":
            return self.attributions.sum(1)
        if reduce == "abs":
            return self.attributions.abs().sum(1)
        raise ValueError(f"unknown reduction {reduce!r}; use sum or abs")


def input_attribution(
    score: Callable[..., torch.Tensor],
    images: torch.Tensor,
    *,
    args: tuple = (),
    method: str = "integrated_gradients",
    baseline: float | torch.Tensor = 0.0,
    n_steps: int = 64,
    internal_batch_size: int | None = None,
) -> InputAttribution:
    """Attribute ``score(images, *args)`` to input pixels with captum.

    ``integrated_gradients``: ``IntegratedGradients`` from ``baseline`` (default 0 = mid-grey
    in the normalised input), ``n_steps`` Gauss-Legendre points (``internal_batch_size`` bounds
    memory); ``input_x_gradient``: ``InputXGradient``.
    """
    from captum.attr import InputXGradient, IntegratedGradients

    if method not in INPUT_METHODS:
        raise ValueError(f"unknown attribution method {method!r}; use one of {', '.join(INPUT_METHODS)}")
    args = tuple(args)
    with _gradients_allowed():
        inputs = images.detach().clone()
        if method == "input_x_gradient":
            attr = InputXGradient(score).attribute(inputs.requires_grad_(), additional_forward_args=args)
            with torch.no_grad():
                value = score(images, *args)
            return InputAttribution(method, attr.detach(), value.detach())
        base = torch.full_like(inputs, float(baseline)) if not torch.is_tensor(baseline) else baseline.to(inputs).expand_as(inputs).contiguous()
        attr, delta = IntegratedGradients(score).attribute(
            inputs, baselines=base, additional_forward_args=args, n_steps=n_steps, method="gausslegendre",
            internal_batch_size=internal_batch_size, return_convergence_delta=True,
        )
        with torch.no_grad():
            value, base_value = score(images, *args), score(base, *args)
    return InputAttribution(method, attr.detach(), value.detach(), base_value.detach(), delta.detach())
