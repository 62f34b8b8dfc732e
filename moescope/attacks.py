"""Adversarial attacks on embedding models, on the [0, 1] image before normalisation (issue 12).

The attacked function is :class:`EmbeddingModel`: [0, 1] images -> L2-normalised embeddings
(the model's normalisation inside), so budgets ``eps`` / ``alpha`` are in pixel units
(8/255 = eight grey levels). The attacks are ``captum.robust`` perturbations, one class per
algorithm with one verb, ``perturb``:

- ``FGSM``: captum's, unchanged (L-inf, one step of size ``eps``).
- :class:`PGD`: captum's, with its L2 random start fixed (captum draws one radius per batch
  row but broadcasts it along the image width, which fails for any batch size other than 1 or
  the image width, and draws it on the CPU).
- :class:`MIM`: momentum iterative FGSM (Dong et al. 2018), written here with PGD's
  constructor and ``perturb`` signature plus ``decay``, so it composes with captum's
  ``AttackComparator``.

Embedding models have no class probabilities, so the losses (:data:`LOSSES`) compare the
embedding with a reference embedding passed as captum's ``target``: ``mate-away`` (the probe's
gallery mate), ``clean-away`` (the probe's own clean embedding; zero gradient at the clean image,
so it needs a random start) and ``impostor-toward`` (a chosen other identity). Every loss is a
per-example objective of shape ``[B]`` that the attacker *increases* (captum ``targeted=False``),
so "loss after >= loss before" means the attack worked for all three.

Attacks run inside :func:`attack_mode`: eval mode and frozen parameters, both restored; each
step's graph is freed before the next (inputs are detached between steps), so memory is flat.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _select_targets,
)
from captum._utils.gradient import compute_gradients
from captum.robust import FGSM, Perturbation
from captum.robust import PGD as _CaptumPGD
from torch import Tensor, nn

from facemoe_model.data.images import normalise
from facemoe_model.inference import eval_mode

from .errors import DataError, MoescopeError

__all__ = [
    "ATTACKS",
    "NORMS",
    "DEFAULT_EPS",
    "DEFAULT_ALPHA",
    "DEFAULT_STEPS",
    "DEFAULT_DECAY",
    "EmbeddingModel",
    "attack_mode",
    "AttackLoss",
    "LOSSES",
    "get_loss",
    "reference_embeddings",
    "FGSM",
    "PGD",
    "MIM",
    "AttackSetting",
    "AttackOutcome",
    "attack_objective",
    "run_attack",
    "parse_eps",
]

ATTACKS: tuple[str, ...] = ("fgsm", "pgd", "mim")
NORMS: tuple[str, ...] = ("Linf", "L2")
DEFAULT_EPS = 8 / 255
DEFAULT_ALPHA = 2 / 255
DEFAULT_STEPS = 10
DEFAULT_DECAY = 1.0


# --- the attacked function --------------------------------------------------------------------


class EmbeddingModel(nn.Module):
    """[0, 1] images ``[B, 3, H, W]`` -> L2-normalised embeddings ``[B, D]`` of ``model``.

    The model sees :func:`facemoe_model.data.images.normalise` of the input, ``(x - 0.5) / 0.5``.
    With ``flip`` the embeddings of the image and of its horizontal mirror are summed before
    normalising, as in :func:`facemoe_model.evaluate.embed_images`. Holds no state of its own; the caller sets
    the model's mode (:func:`attack_mode`).
    """

    def __init__(self, model: nn.Module, flip: bool = False) -> None:
        super().__init__()
        self.model = model
        self.flip = flip

    def forward(self, x01: Tensor) -> Tensor:
        x = normalise(x01)
        if self.flip:
            both = self.model(torch.cat([x, x.flip(-1)]))
            embedding = both[: len(x)] + both[len(x) :]
        else:
            embedding = self.model(x)
        return F.normalize(embedding.float(), dim=1)


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, frozen parameters and gradients enabled; every flag is restored afterwards.

    Freezing the parameters keeps the attack from building weight gradients (only the input
    gradient is needed) and from touching ``.grad``.
    """
    grads = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            with torch.enable_grad():
                yield model
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)


# --- losses -------------------------------------------------------------------------------------


def _away(embeddings: Tensor, reference: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(embeddings, reference, dim=1)


def _toward(embeddings: Tensor, reference: Tensor) -> Tensor:
    return F.cosine_similarity(embeddings, reference, dim=1)


@dataclass(frozen=True)
class AttackLoss:
    """A per-example attack objective ``loss(embeddings, reference) -> [B]`` that the attacker increases.

    Attributes:
        name: ``mate-away`` / ``clean-away`` / ``impostor-toward``.
        reference: what ``reference`` holds (the captum ``target``).
        targeted: the attack pulls towards a chosen identity (still maximised: cosine similarity).
        zero_gradient_at_start: the gradient vanishes at the clean image (the reference is its
            own embedding), so iterative attacks need a random start and FGSM does nothing.
    """

    name: str
    reference: str
    targeted: bool
    zero_gradient_at_start: bool
    fn: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, embeddings: Tensor, reference: Tensor) -> Tensor:
        return self.fn(embeddings, reference)

    @property
    def needs_random_start(self) -> bool:
        """Whether an iterative attack must start at a random point of the eps-ball."""
        return self.zero_gradient_at_start

    def start_note(self, attack: str) -> str | None:
        """One line for the output when this loss changes how ``attack`` starts, else None."""
        if not self.zero_gradient_at_start:
            return None
        if attack == "fgsm":
            return f"{self.name}: the gradient is zero at the clean image and FGSM has no random start, so FGSM leaves the probes unchanged"
        return f"{self.name}: the gradient is zero at the clean image, so {attack.upper()} starts at a random point of the eps-ball"


LOSSES: dict[str, AttackLoss] = {
    loss.name: loss
    for loss in (
        AttackLoss("mate-away", "the probe's gallery-mate embedding", False, False, _away),
        AttackLoss("clean-away", "the probe's own clean embedding", False, True, _away),
        AttackLoss("impostor-toward", "a chosen other identity's embedding", True, False, _toward),
    )
}


def get_loss(name: str) -> AttackLoss:
    """The loss called ``name`` (:data:`LOSSES`); a one-line error for an unknown name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise MoescopeError(f"unknown attack loss {name!r}; choose {', '.join(LOSSES)}") from None


def reference_embeddings(
    loss: AttackLoss | str,
    probe_labels: np.ndarray,
    clean_embeddings: Tensor,
    gallery_embeddings: Tensor,
    gallery_labels: np.ndarray,
    seed: int = 0,
) -> Tensor:
    """The ``target`` of each probe for ``loss``: ``[B, D]`` L2-normalised embeddings.

    ``mate-away``: the mean gallery embedding of the probe's identity; ``clean-away``: the
    probe's clean embedding; ``impostor-toward``: the mean gallery embedding of another gallery
    identity drawn uniformly per probe (seeded; distractors, label -1, are never chosen).
    """
    loss = get_loss(loss) if isinstance(loss, str) else loss
    if loss.name == "clean-away":
        return F.normalize(clean_embeddings.detach().float(), dim=1)
    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    identities = np.unique(gallery_labels[gallery_labels >= 0])
    gallery = F.normalize(gallery_embeddings.detach().float(), dim=1)
    templates = torch.stack([gallery[torch.from_numpy(gallery_labels == i)].mean(0) for i in identities]) if len(identities) else gallery[:0]
    row_of = {int(i): r for r, i in enumerate(identities)}
    if loss.name == "mate-away":
        missing = sorted({int(l) for l in probe_labels if int(l) not in row_of})
        if missing:
            raise DataError(f"mate-away: {len(missing)} probe identities have no gallery image (first label: {missing[0]})")
        rows = [row_of[int(l)] for l in probe_labels]
    else:
        if len(identities) < 2:
            raise DataError(f"impostor-toward needs at least 2 gallery identities, got {len(identities)}")
        rng = np.random.default_rng(seed)
        rows = []
        for label in probe_labels:
            others = [r for r, i in enumerate(identities) if i != label]
            rows.append(others[int(rng.integers(len(others)))])
    return F.normalize(templates[torch.as_tensor(rows, dtype=torch.long)], dim=1)


# --- attacks ------------------------------------------------------------------------------------


def _random_point(center: Tensor, radius: float, norm: str, mask: Tensor | int) -> Tensor:
    """A uniform random point of the ``norm`` ball of ``radius`` around each row of ``center``."""
    if norm == "Linf":
        return center + (torch.rand_like(center) * radius * 2 - radius) * mask
    if norm == "L2":
        direction = F.normalize(torch.randn_like(center).flatten(1), dim=1).view_as(center)
        d = center[0].numel()
        r = torch.rand(center.shape[0], device=center.device, dtype=center.dtype) ** (1.0 / d) * radius
        return center + r.view(-1, *(1,) * (center.dim() - 1)) * direction * mask
    raise AssertionError("Norm constraint must be L2 or Linf.")


class PGD(_CaptumPGD):
    """captum's :class:`~captum.robust.PGD` (same constructor and ``perturb``), with a correct
    uniform L2 random start (one radius per example, on the input's device)."""

    def _random_point(self, center: Tensor, radius: float, norm: str, mask: Tensor | int) -> Tensor:
        if norm == "Linf":  # captum's own draw, unchanged
            return super()._random_point(center, radius, norm, mask)
        return _random_point(center, radius, norm, mask)


class MIM(Perturbation):
    r"""Momentum iterative FGSM (Dong et al. 2018, https://arxiv.org/abs/1710.06081).

    Per example and step, with ``∇`` the loss gradient at the current point::

        g <- decay * g + ∇ / ||∇||_1
        x <- Clip_r(x + step_size * sign(g))      (targeted: x - step_size * sign(g))

    then clamped to ``[lower_bound, upper_bound]``. ``Clip_r`` projects onto the ``norm`` ball
    of ``radius`` around the input (``L2``: captum's convention, sign steps and an L2
    projection). Gradient entries with ``|∇| <= zero_thresh`` count as zero, as in captum's
    FGSM, so with ``decay = 0`` MIM is captum's PGD step for step. Constructor and ``perturb``
    as :class:`~captum.robust.PGD`, plus ``decay``.
    """

    def __init__(
        self,
        forward_func: Callable,
        loss_func: Optional[Callable] = None,
        lower_bound: float = float("-inf"),
        upper_bound: float = float("inf"),
    ) -> None:
        super().__init__()
        self.forward_func = forward_func
        self.loss_func = loss_func
        self.bound = lambda x: torch.clamp(x, min=lower_bound, max=upper_bound)
        self.zero_thresh = 10**-6

    def _gradients(self, inputs: tuple[Tensor, ...], target: Any, additional_forward_args: Optional[object]) -> tuple[Tensor, ...]:
        inputs = tuple(x.detach().requires_grad_() for x in inputs)  # fresh leaves: no graph across steps

        def forward_with_loss() -> Tensor:
            additional = _format_additional_forward_args(additional_forward_args)
            outputs = self.forward_func(*((*inputs, *additional) if additional is not None else inputs))
            if self.loss_func is not None:
                return self.loss_func(outputs, target)
            return _select_targets(-torch.log(outputs), target)

        grads = compute_gradients(forward_with_loss, inputs)
        return tuple(g.detach() for g in grads)

    def perturb(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        radius: float,
        step_size: float,
        step_num: int,
        target: Any,
        additional_forward_args: Optional[object] = None,
        targeted: bool = False,
        random_start: bool = False,
        norm: str = "Linf",
        mask: Optional[Tensor | tuple[Tensor, ...]] = None,
        decay: float = DEFAULT_DECAY,
    ) -> Tensor | tuple[Tensor, ...]:
        """The perturbed inputs (same shapes), detached; arguments as :meth:`captum.robust.PGD.perturb`.

        ``decay`` is the momentum factor ``mu`` (0: no momentum, plain PGD).
        """
        if norm not in NORMS:
            raise AssertionError("Norm constraint must be L2 or Linf.")

        def clip(center: Tensor, point: Tensor) -> Tensor:  # exactly captum PGD's projection
            diff = point - center
            if norm == "Linf":
                return center + torch.clamp(diff, -radius, radius)
            return center + torch.renorm(diff, 2, 0, radius)

        is_tuple = _is_tuple(inputs)
        originals = tuple(x.detach() for x in _format_tensor_into_tuples(inputs))
        masks = _format_tensor_into_tuples(mask) if mask is not None else (1,) * len(originals)
        current = originals
        if random_start:
            current = tuple(self.bound(_random_point(x, radius, norm, m)) for x, m in zip(originals, masks))
        momentum = tuple(torch.zeros_like(x) for x in originals)
        multiplier = -1 if targeted else 1
        for _ in range(step_num):
            grads = self._gradients(current, target, additional_forward_args)
            momentum = tuple(
                decay * g + torch.where(grad.abs() > self.zero_thresh, grad, 0.0) / _l1_per_example(grad)
                for g, grad in zip(momentum, grads)
            )
            # step, project, clamp: the order of captum's PGD (its inner FGSM is unbounded)
            current = tuple(x + multiplier * step_size * torch.sign(g) * m for x, g, m in zip(current, momentum, masks))
            current = tuple(self.bound(clip(x0, x)).detach() for x0, x in zip(originals, current))
        return _format_output(is_tuple, current)


def _l1_per_example(grad: Tensor) -> Tensor:
    """``||grad||_1`` of each example, shaped to broadcast against ``grad`` (never 0)."""
    norms = grad.abs().flatten(1).sum(1).clamp_min(torch.finfo(grad.dtype).tiny)
    return norms.view(-1, *(1,) * (grad.dim() - 1))


# --- one attack setting -------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackSetting:
    """One row of an attack sweep: the algorithm and its budget (pixel units on [0, 1] images).

    ``random_start=None`` means: start at a random point exactly when the loss needs it
    (:attr:`AttackLoss.needs_random_start`); FGSM never does. FGSM takes one step of size
    ``eps`` (``alpha`` and ``steps`` unused).
    """

    attack: str
    eps: float = DEFAULT_EPS
    alpha: float = DEFAULT_ALPHA
    steps: int = DEFAULT_STEPS
    norm: str = "Linf"
    decay: float = DEFAULT_DECAY
    random_start: bool | None = None

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise MoescopeError(f"unknown attack {self.attack!r}; choose {', '.join(ATTACKS)}")
        if self.norm not in NORMS:
            raise MoescopeError(f"unknown attack norm {self.norm!r}; choose {', '.join(NORMS)}")
        if self.attack == "fgsm" and (self.norm != "Linf" or self.random_start):
            raise MoescopeError("fgsm is an L-inf attack without random start (use pgd for L2 or a random start)")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise MoescopeError(f"attack eps must be a finite number >= 0, got {self.eps}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise MoescopeError(f"attack step size alpha must be > 0, got {self.alpha}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise MoescopeError(f"attack steps must be an integer >= 1, got {self.steps}")
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise MoescopeError(f"MIM decay must be a finite number >= 0, got {self.decay}")

    @property
    def gradient_steps(self) -> int:
        """Forward+backward passes the attack makes per probe."""
        return 1 if self.attack == "fgsm" else int(self.steps)

    def uses_random_start(self, loss: AttackLoss) -> bool:
        """Whether this setting starts at a random point for ``loss``."""
        if self.attack == "fgsm":
            return False
        return loss.needs_random_start if self.random_start is None else bool(self.random_start)

    def create(self, forward_func: Callable, loss: AttackLoss) -> Perturbation:
        """The captum perturbation on ``forward_func`` with ``loss``, bounded to [0, 1]."""
        cls = {"fgsm": FGSM, "pgd": PGD, "mim": MIM}[self.attack]
        return cls(forward_func, loss, lower_bound=0.0, upper_bound=1.0)

    def perturb_kwargs(self, loss: AttackLoss) -> dict[str, Any]:
        """Keyword arguments of ``create(...).perturb(inputs, target=reference, **kwargs)``."""
        if self.attack == "fgsm":
            return {"epsilon": self.eps}
        kwargs = {"radius": self.eps, "step_size": self.alpha, "step_num": int(self.steps), "norm": self.norm,
                  "random_start": self.uses_random_start(loss)}
        if self.attack == "mim":
            kwargs["decay"] = self.decay
        return kwargs


@torch.no_grad()
def attack_objective(embedder: nn.Module, loss: AttackLoss, x01: Tensor, reference: Tensor) -> Tensor:
    """``loss`` of ``x01`` against ``reference`` per example, ``[B]``, without a graph."""
    return loss(embedder(x01), reference).detach()


@dataclass(frozen=True)
class AttackOutcome:
    """One batch attacked: the adversarial [0, 1] images and what the attack achieved (all ``[B]``, detached)."""

    adversarial: Tensor
    loss_before: Tensor
    loss_after: Tensor
    linf: Tensor
    l2: Tensor


def run_attack(
    setting: AttackSetting,
    embedder: EmbeddingModel,
    loss: AttackLoss,
    x01: Tensor,
    reference: Tensor,
    seed: int = 0,
) -> AttackOutcome:
    """Attack one batch of [0, 1] images in :func:`attack_mode`, deterministically for ``seed``.

    The random start (if any) draws from a forked RNG seeded with ``seed``, so the global RNG is
    untouched. Returns the adversarial images with the loss before/after and the achieved
    L-inf / L2 perturbation norms per example.
    """
    x01, reference = x01.detach(), reference.detach()
    devices = [x01.device.index or 0] if x01.device.type == "cuda" else []
    with attack_mode(embedder.model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        before = attack_objective(embedder, loss, x01, reference)
        with warnings.catch_warnings():  # captum's FGSM warns on every input that does not require grad
            warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
            adversarial = setting.create(embedder, loss).perturb(x01, target=reference, **setting.perturb_kwargs(loss))
        adversarial = adversarial.detach()
        after = attack_objective(embedder, loss, adversarial, reference)
    delta = (adversarial - x01).flatten(1)
    return AttackOutcome(adversarial, before, after, delta.abs().amax(1), delta.norm(dim=1))


def parse_eps(text: str) -> list[float]:
    """``"1/255,2/255,0.03"`` -> budgets as floats (fractions ``a/b`` or decimals, each >= 0)."""
    values = []
    for item in (part.strip() for part in str(text).split(",")):
        try:
            num, _, den = item.partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise MoescopeError(f"--eps: cannot read {item!r}; give numbers or fractions like 8/255, comma-separated") from None
        if not (math.isfinite(value) and value >= 0):
            raise MoescopeError(f"--eps: budgets must be finite and >= 0, got {item!r}")
        values.append(value)
    return values
