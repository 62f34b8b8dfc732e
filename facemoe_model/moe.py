"""The FaceMoE mixture-of-experts layer: N FFN experts behind a token-level top-k router.

The layer is the single source of truth for routing:

* it exposes exactly what it computed (router logits, rank-ordered top-k experts, combine
  weights, token grid) through the hook point ``hook_routing`` — a pass-through module that
  receives a :class:`RouterOutput` on every forward pass, so observers attach ordinary
  ``register_forward_hook`` hooks and never recompute routing on the side;
* a second hook point, ``hook_expert_outputs``, receives :class:`ExpertOutputs` (each expert's
  weighted contribution to each token); it is computed only while a hook is attached;
* it accepts one documented intervention, :class:`RoutingOverride` (``layer.override``),
  applied inside the routing step; :func:`override_routing` sets it on chosen layers and
  restores the previous value exactly, even on exceptions.

Combine weights (``weighting``):

* ``"logits"`` — the official FaceMoE behaviour: the raw top-k router logits are the weights
  (no softmax, no renormalisation);
* ``"softmax"`` — softmax over all experts, then top-k (``renormalize=True`` rescales the k
  weights to sum to 1).

Auxiliary losses (``aux_loss``), stored per forward pass in ``layer.aux_loss``:

* ``"official"`` — ``1e-3 * mean(logits^2) + 1e-2 * E * sum_e(importance_e * load_e) / T^2``
  with ``importance_e = sum_t softmax(logits)_te`` and ``load_e`` the number of tokens whose
  top-k contains ``e`` (T tokens);
* ``"switch"`` — ST-MoE router z-loss ``1e-3 * mean(logsumexp(logits)^2)`` plus the Switch
  balance loss ``1e-2 * E * sum_e(f_e * P_e)`` (``f_e`` share of tokens whose top-1 is ``e``,
  ``P_e`` mean router probability).

Random routing (``RoutingOverride(random_seed=s)``) is a pure function of
``(seed, layer name, image key, token, expert)`` — a counter-based hash (splitmix64), no
generator state — so an image gets the same experts whatever batch it is in. Image keys are
set per batch with :func:`sample_keys`; without them each layer numbers the images it has
seen since its override was set (0, 1, 2, ... in the order they arrive).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

__all__ = [
    "MoEConfig",
    "Router",
    "HookPoint",
    "RouterOutput",
    "ExpertOutputs",
    "RoutingOverride",
    "MoELayer",
    "override_routing",
    "sample_keys",
    "moe_layers",
    "select_moe_layers",
    "uniform_num_experts",
    "total_aux_loss",
]

Weighting = Literal["logits", "softmax"]
AuxLossKind = Literal["official", "switch"]


@dataclass(frozen=True)
class MoEConfig:
    """The MoE settings a backbone gives every one of its MoE layers (see :class:`MoELayer`).

    The field names are the model keyword arguments (``create_model(..., top_k=1)``).
    """

    num_experts: int = 3
    top_k: int = 2
    weighting: Weighting = "logits"
    renormalize: bool = False
    aux_loss: AuxLossKind = "official"
    z_loss_coef: float = 1e-3
    balance_coef: float = 1e-2

    def layer(
        self,
        dim: int,
        hidden_dim: int,
        *,
        dropout: float = 0.0,
        token_grid: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
    ) -> "MoELayer":
        """An :class:`MoELayer` with these settings on ``dim`` channels."""
        return MoELayer(
            dim, hidden_dim, self.num_experts, self.top_k, weighting=self.weighting, renormalize=self.renormalize,
            aux_loss=self.aux_loss, z_loss_coef=self.z_loss_coef, balance_coef=self.balance_coef, dropout=dropout,
            token_grid=token_grid, num_prefix_tokens=num_prefix_tokens,
        )


class Router(nn.Module):
    """Token-level router: ``gate = Linear(dim, num_experts, bias=False)`` gives the logits."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


class HookPoint(nn.Module):
    """Identity module whose forward hooks observe a value (TransformerLens-style)."""

    def forward(self, value):  # noqa: D401 - identity
        return value

    @property
    def observed(self) -> bool:
        """Whether a forward hook is attached (then the layer computes what this point shows)."""
        return bool(self._forward_hooks)


@dataclass(frozen=True)
class RouterOutput:
    """What one MoE layer computed for one forward pass.

    Tokens are flattened over all leading dimensions: ``T = batch_size * tokens_per_image``.

    Attributes:
        logits: router logits ``[T, E]`` (float).
        topk_indices: experts that processed each token, rank-ordered by the router ``[T, k]``.
        combine_weights: the weight each of those experts' outputs received ``[T, k]``.
        router_indices: the router's own top-k choice before a ``permutation``/``random``
            override (the same tensor as ``topk_indices`` when no override changed it).
        batch_size: images in the batch.
        grid: ``(rows, cols)`` token grid of this layer, or None when unknown.
        num_prefix_tokens: tokens before the grid tokens (e.g. a class token).
        weighting: the layer's combine-weight mode.
    """

    logits: torch.Tensor
    topk_indices: torch.Tensor
    combine_weights: torch.Tensor
    router_indices: torch.Tensor
    batch_size: int
    grid: tuple[int, int] | None
    num_prefix_tokens: int
    weighting: str

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def k(self) -> int:
        return self.topk_indices.shape[-1]

    @property
    def tokens_per_image(self) -> int:
        return self.logits.shape[0] // self.batch_size

    @property
    def probs(self) -> torch.Tensor:
        """Router probabilities ``softmax(logits)`` ``[T, E]``."""
        return self.logits.float().softmax(dim=-1)


@dataclass(frozen=True)
class ExpertOutputs:
    """Each expert's weighted contribution to each token in one forward pass (``hook_expert_outputs``).

    Attributes:
        contributions: ``[T, E, C]``: ``combine_weight * expert(token)`` for the experts that
            processed the token, zero for the others; summed over ``E`` it is the layer output.
        topk_indices: experts that processed each token ``[T, k]`` (as in :class:`RouterOutput`).
        batch_size / grid / num_prefix_tokens: as in :class:`RouterOutput`.
    """

    contributions: torch.Tensor
    topk_indices: torch.Tensor
    batch_size: int
    grid: tuple[int, int] | None
    num_prefix_tokens: int

    @property
    def tokens_per_image(self) -> int:
        return self.contributions.shape[0] // self.batch_size


@dataclass(frozen=True)
class RoutingOverride:
    """One intervention on a layer's routing; fields compose (drop, then random, then switch).

    Attributes:
        dropped: experts that can never be selected: their logits are masked to ``-inf``
            before top-k. When fewer than ``k`` experts remain, ``k`` shrinks to the number
            left (``MoELayer.effective_k`` tells).
        permutation: switch experts after top-k: a token routed to expert ``e`` is processed
            by expert ``permutation[e]`` with the weight the router gave ``e``.
        random_seed: when set, each token's top-k experts are drawn uniformly at random among
            the experts not dropped, as a function of ``(seed, layer name, image key, token)``
            only (see the module docstring); their weights are the router's weights for the
            drawn experts.
        k: force the number of experts per token.
    """

    dropped: tuple[int, ...] = ()
    permutation: tuple[int, ...] | None = None
    random_seed: int | None = None
    k: int | None = None

    def validate(self, num_experts: int, layer_name: str = "layer") -> None:
        """Raise ``ValueError`` with a one-line message when the override does not fit."""
        bad = [e for e in self.dropped if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"expert {bad[0]} out of range for {layer_name}: it has {num_experts} experts (0..{num_experts - 1})")
        if len(set(self.dropped)) >= num_experts:
            raise ValueError(f"cannot drop all {num_experts} experts of {layer_name}")
        if self.permutation is not None and sorted(self.permutation) != list(range(num_experts)):
            raise ValueError(f"switch permutation {list(self.permutation)} is not a permutation of 0..{num_experts - 1} for {layer_name}")
        if self.k is not None and not 1 <= self.k <= num_experts:
            raise ValueError(f"k={self.k} out of range for {layer_name} with {num_experts} experts")


# --- counter-based random draws (splitmix64 in int64 arithmetic) ---------------------------


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (as uint64) values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's step on int64 tensors (wrap-around arithmetic = uint64 arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def name_salt(name: str) -> int:
    """A stable int64 from a layer name (the layer's part of every random draw)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little", signed=True)


def random_scores(seed: int, salt: int, keys: torch.Tensor, tokens_per_image: int, num_experts: int) -> torch.Tensor:
    """Uniform random scores ``[len(keys) * tokens_per_image, E]`` (non-negative int64).

    Entry ``(image b, token t, expert e)`` is a hash of ``(seed, salt, keys[b], t, e)`` only.
    """
    device = keys.device
    base = _splitmix(_splitmix(torch.tensor(_int64(seed), dtype=torch.int64, device=device)) ^ _int64(salt))
    per_image = _splitmix(base ^ keys.to(torch.int64))  # [B]
    cells = torch.arange(tokens_per_image * num_experts, dtype=torch.int64, device=device)  # t * E + e
    scores = _shift_right(_splitmix(per_image[:, None] ^ cells[None, :]), 1)
    return scores.reshape(-1, num_experts)


class MoELayer(nn.Module):
    """Mixture of ``num_experts`` FFN experts with a token-level top-k router.

    Args:
        dim: token channels.
        hidden_dim: expert hidden width (``mlp_ratio * dim``).
        num_experts: N.
        k: experts per token.
        weighting: ``"logits"`` (official) or ``"softmax"``.
        renormalize: with ``"softmax"``, rescale the top-k weights to sum to 1.
        aux_loss: ``"official"`` or ``"switch"``.
        z_loss_coef / balance_coef: coefficients of the two auxiliary terms.
        dropout: expert dropout.
        token_grid: ``(rows, cols)`` of the tokens this layer sees (set by the model), used
            when the input is ``[B, N, C]``; for ``[B, H, W, C]`` input the grid is the shape.
        num_prefix_tokens: non-grid tokens at the start of each sequence (class token).

    Each expert is timm's ``Mlp`` (``fc1 -> GELU -> dropout -> fc2 -> dropout``, the official
    key names). Input of any leading shape ``[..., C]`` (the first dimension is the batch);
    output has the same shape. After each forward pass ``aux_loss`` holds this layer's
    auxiliary loss (a scalar tensor).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 3,
        k: int = 2,
        *,
        weighting: Weighting = "logits",
        renormalize: bool = False,
        aux_loss: AuxLossKind = "official",
        z_loss_coef: float = 1e-3,
        balance_coef: float = 1e-2,
        dropout: float = 0.0,
        token_grid: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be in 1..num_experts={num_experts}")
        if weighting not in ("logits", "softmax"):
            raise ValueError(f"unknown weighting {weighting!r}; use 'logits' or 'softmax'")
        if aux_loss not in ("official", "switch"):
            raise ValueError(f"unknown aux_loss {aux_loss!r}; use 'official' or 'switch'")
        self.num_experts = num_experts
        self.k = k
        self.weighting = weighting
        self.renormalize = renormalize
        self.aux_loss_kind = aux_loss
        self.z_loss_coef = z_loss_coef
        self.balance_coef = balance_coef
        self.token_grid = tuple(token_grid) if token_grid is not None else None
        self.num_prefix_tokens = num_prefix_tokens
        self.experts = nn.ModuleList(Mlp(dim, hidden_dim, act_layer=nn.GELU, drop=dropout) for _ in range(num_experts))
        self.router = Router(dim, num_experts)
        self.hook_routing = HookPoint()
        self.hook_expert_outputs = HookPoint()
        self.aux_loss: torch.Tensor | None = None
        self.random_salt = 0  # this layer's part of random draws (override_routing: a hash of its name)
        self._override: RoutingOverride | None = None
        self._images_seen = 0  # images routed since the override was set (default random-routing keys)
        self._sample_keys: torch.Tensor | None = None  # set by sample_keys()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, weighting={self.weighting!r}, aux_loss={self.aux_loss_kind!r}"

    @property
    def override(self) -> RoutingOverride | None:
        """The routing intervention in force (None: the router decides). Setting it restarts the image count."""
        return self._override

    @override.setter
    def override(self, value: RoutingOverride | None) -> None:
        self._override = value
        self._images_seen = 0

    @property
    def effective_k(self) -> int:
        """Experts per token under the current override (k shrinks when experts are dropped)."""
        o = self.override
        k = self.k if o is None or o.k is None else o.k
        if o is not None:
            k = min(k, self.num_experts - len(set(o.dropped)))
        return k

    # -- routing ---------------------------------------------------------------------------
    def _combine_weights(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.weighting == "logits":
            return logits.gather(-1, indices)
        weights = logits.float().softmax(dim=-1).gather(-1, indices).to(logits.dtype)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return weights

    def _image_keys(self, batch_size: int, device: torch.device) -> torch.Tensor:
        keys = self._sample_keys
        if keys is None:
            keys = torch.arange(self._images_seen, self._images_seen + batch_size, dtype=torch.int64)
        elif keys.shape != (batch_size,):
            raise ValueError(f"sample_keys gave {keys.numel()} keys for a batch of {batch_size} images")
        return keys.to(device)

    def route(
        self,
        tokens: torch.Tensor,
        batch_size: int = 1,
        grid: tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
    ) -> RouterOutput:
        """Router step on flat tokens ``[T, C]`` of ``batch_size`` images: what runs, with which weight."""
        logits = self.router(tokens)
        o = self.override
        k = self.effective_k
        selectable = logits
        if o is not None and o.dropped:
            mask = torch.zeros(self.num_experts, dtype=torch.bool, device=logits.device)
            mask[list(o.dropped)] = True
            selectable = logits.masked_fill(mask, float("-inf"))
        router_indices = selectable.topk(k, dim=-1).indices
        indices = router_indices
        if o is not None and o.random_seed is not None:
            keys = self._image_keys(batch_size, logits.device)
            scores = random_scores(o.random_seed, self.random_salt, keys, logits.shape[0] // batch_size, self.num_experts)
            if o.dropped:
                scores = scores.masked_fill(mask, -1)
            indices = scores.topk(k, dim=-1).indices
        if o is not None:
            self._images_seen += batch_size
        weights = self._combine_weights(logits, indices)
        if o is not None and o.permutation is not None:
            perm = torch.as_tensor(o.permutation, device=indices.device)
            indices = perm[indices]
        return RouterOutput(
            logits=logits,
            topk_indices=indices,
            combine_weights=weights,
            router_indices=router_indices,
            batch_size=batch_size,
            grid=grid,
            num_prefix_tokens=num_prefix_tokens,
            weighting=self.weighting,
        )

    def _aux_loss(self, logits: torch.Tensor, router_indices: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        num_tokens = logits.shape[0]
        probs = logits.softmax(dim=-1)
        if self.aux_loss_kind == "official":
            z = logits.pow(2).mean()
            importance = probs.sum(dim=0)
            load = F.one_hot(router_indices, self.num_experts).amax(dim=1).sum(dim=0).to(probs.dtype)
            balance = self.num_experts * (importance * load).sum() / num_tokens**2
        else:
            z = torch.logsumexp(logits, dim=-1).pow(2).mean()
            top1 = F.one_hot(router_indices[:, 0], self.num_experts).to(probs.dtype).mean(dim=0)
            balance = self.num_experts * (top1 * probs.mean(dim=0)).sum()
        return self.z_loss_coef * z + self.balance_coef * balance

    # -- dispatch --------------------------------------------------------------------------
    def _dispatch(
        self, tokens: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, contributions: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_tokens, k = indices.shape
        flat_experts = indices.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_ids = order // k
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        expert_inputs = tokens.index_select(0, token_ids).split(counts)
        outputs = [expert(chunk) for expert, chunk, n in zip(self.experts, expert_inputs, counts) if n]
        if not outputs:
            zeros = torch.zeros_like(tokens)
            return zeros, (zeros.new_zeros(num_tokens, self.num_experts, tokens.shape[-1]) if contributions else None)
        expert_out = torch.cat(outputs)
        pair_weights = weights.reshape(-1).index_select(0, order).to(expert_out.dtype)
        weighted = expert_out * pair_weights.unsqueeze(-1)
        combined = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
        combined.index_add_(0, token_ids, weighted)
        per_expert = None
        if contributions:
            per_expert = expert_out.new_zeros(num_tokens, self.num_experts, expert_out.shape[-1])
            per_expert.index_put_((token_ids, flat_experts.index_select(0, order)), weighted, accumulate=True)
        return combined.to(tokens.dtype), per_expert

    def dispatch(self, tokens: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Run each expert once on exactly its tokens and sum the weighted outputs.

        Token/expert pairs are sorted by expert so each expert sees one contiguous batch;
        the only host synchronisation is reading the per-expert counts.
        """
        return self._dispatch(tokens, indices, weights, contributions=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead_shape, channels = x.shape[:-1], x.shape[-1]
        batch_size = x.shape[0]
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else self.token_grid
        prefix = 0 if x.ndim == 4 else self.num_prefix_tokens
        tokens = x.reshape(-1, channels)
        routing = self.route(tokens, batch_size, grid, prefix)
        self.aux_loss = self._aux_loss(routing.logits, routing.router_indices)
        self.hook_routing(routing)
        want = self.hook_expert_outputs.observed
        combined, per_expert = self._dispatch(tokens, routing.topk_indices, routing.combine_weights, contributions=want)
        if want:
            self.hook_expert_outputs(ExpertOutputs(per_expert, routing.topk_indices, batch_size, grid, prefix))
        return combined.reshape(*lead_shape, channels)


def total_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every MoE layer's auxiliary loss from the model's last forward pass."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoELayer) and m.aux_loss is not None]
    if not losses:
        raise RuntimeError("no auxiliary loss recorded: run a forward pass first")
    return torch.stack(losses).sum()


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """All MoE layers of ``model`` by module name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


def select_moe_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, MoELayer]:
    """MoE layers of ``model`` chosen by exact name or name prefix (``layers.1``), in forward
    order; all of them when ``layers`` is None. Raises ``KeyError`` naming an unknown layer."""
    available = moe_layers(model)
    if not available:
        raise KeyError("the model has no MoE layers")
    if layers is None:
        return available
    wanted = list(layers)
    for name in wanted:
        if not any(n == name or n.startswith(name + ".") for n in available):
            raise KeyError(f"unknown MoE layer {name!r}; available: {', '.join(available)}")
    return {n: m for n, m in available.items() if any(n == w or n.startswith(w + ".") for w in wanted)}


def uniform_num_experts(layers: Mapping[str, MoELayer]) -> int:
    """The expert count shared by ``layers``; ``ValueError`` naming the first layer that differs."""
    if not layers:
        raise ValueError("no MoE layers selected")
    (first, ref), *rest = layers.items()
    for name, layer in rest:
        if layer.num_experts != ref.num_experts:
            raise ValueError(f"mismatched expert counts: {name} has {layer.num_experts} experts, {first} has {ref.num_experts}")
    return ref.num_experts


@contextlib.contextmanager
def override_routing(
    model: nn.Module,
    override: RoutingOverride | Mapping[str, RoutingOverride],
    layers: Iterable[str] | None = None,
) -> Iterator[dict[str, MoELayer]]:
    """Apply a routing override to MoE layers of ``model`` for the ``with`` block.

    ``override`` is one :class:`RoutingOverride` for every chosen layer or a mapping from
    layer name to override. ``layers`` selects layers by name or name prefix (e.g.
    ``layers.2``); default all. Each layer's random draws are salted with its name, and its
    image count restarts at 0. Every previous state (override, image count, salt) is restored
    exactly on exit, also when the block raises. Yields the affected layers by name.
    """
    if isinstance(override, RoutingOverride):
        targets = select_moe_layers(model, layers)
        plan = {name: override for name in targets}
    else:
        targets = select_moe_layers(model, list(override))
        plan = {name: override[next(k for k in override if name == k or name.startswith(k + "."))] for name in targets}
    for name, o in plan.items():
        o.validate(targets[name].num_experts, name)
    saved = {name: (layer._override, layer._images_seen, layer.random_salt) for name, layer in targets.items()}
    try:
        for name, layer in targets.items():
            layer.override = plan[name]
            layer.random_salt = name_salt(name)
        yield targets
    finally:
        for name, layer in targets.items():
            layer._override, layer._images_seen, layer.random_salt = saved[name]


@contextlib.contextmanager
def sample_keys(model: nn.Module, keys: torch.Tensor | Iterable[int] | None) -> Iterator[None]:
    """Give the images of the next forward passes these random-routing keys (one int64 per image).

    With random routing an image's experts depend only on its key (plus seed, layer and token),
    so passing each image's position in a data set makes results independent of batching. The
    keys apply to every MoE layer of ``model`` for the block and must match the batch size;
    ``None`` leaves the layers' running image count in charge. Restored on exit.
    """
    if keys is None:
        yield
        return
    keys = torch.as_tensor(keys, dtype=torch.int64).reshape(-1)
    layers = list(moe_layers(model).values())
    saved = [layer._sample_keys for layer in layers]
    try:
        for layer in layers:
            layer._sample_keys = keys
        yield
    finally:
        for layer, previous in zip(layers, saved):
            layer._sample_keys = previous
