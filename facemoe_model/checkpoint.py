"""Loading and saving FaceMoE checkpoints — official ``model.pt`` files and the package's own.

Two formats are accepted, both read with ``torch.load(..., weights_only=True)`` so nothing
can unpickle arbitrary objects:

* **official** — the authors' ``model.pt``: a bare ``state_dict`` with the official key names
  (``layers.1.blocks.17.mlp.experts.2.fc1.weight`` ...). The architecture is inferred from
  the keys and shapes alone (:func:`infer_official_config`); ``top_k`` is not stored in such
  a file and defaults to 2 (override with ``top_k=``). A dict wrapping such a state_dict under
  ``state_dict`` or ``model`` is accepted too.
* **facemoe** — ``{"format": "facemoe", "version": 1, "config": {"name": ..., **kwargs},
  "state_dict": ..., "metadata": {...}}`` written by :func:`save_checkpoint`; ``config`` is
  everything ``create_model`` needs to rebuild the model. Files written before the model
  package stood alone (the bundled demo checkpoints among them) name the same layout
  ``"moescope.facemoe"``; they load unchanged (:data:`LEGACY_FORMATS`).

An official state_dict saved as ``.safetensors`` (no pickle at all) is read too.

Every problem — missing file, a pipe/socket/device (refused before opening: reading a FIFO
would block), empty/truncated/corrupt file or random bytes, pickled code, unknown layout, a
config no model can be built from (any exception of the constructor), missing or unexpected
keys, shape mismatches, inconsistent expert counts, ``top_k`` outside 1..experts — raises
:class:`~facemoe_model.errors.CheckpointError` with a one-line message naming it.
"""
from __future__ import annotations

import math
import pickle
import re
import stat
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .errors import CheckpointError
from .fileio import atomic_path
from .models import create_model

__all__ = ["load_checkpoint", "save_checkpoint", "read_checkpoint", "infer_official_config", "CHECKPOINT_FORMAT", "LEGACY_FORMATS"]

CHECKPOINT_FORMAT = "facemoe"
"""The ``format`` entry :func:`save_checkpoint` writes (and ``model.checkpoint_format`` of such a file)."""
LEGACY_FORMATS = frozenset({"moescope.facemoe"})
"""Earlier names of the same layout, still read."""
CHECKPOINT_VERSION = 1
# Buffers the official files store that our modules derive (timm keeps them non-persistent);
# they are checked for equality on load instead of being loaded.
_DERIVED_BUFFERS = re.compile(r"(\.attn\.relative_position_index|\.attn_mask)$")
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_EXPERT_KEY = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.fc1\.weight$")


def _refuse_non_file(path: Path) -> None:
    """One-line errors for paths that are not regular files (checked before opening: a FIFO would block)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or type(exc).__name__}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a pipe, socket or device)")


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or type(exc).__name__}") from None


def _is_safetensors(head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors comes with timm
        raise CheckpointError(f"{path} is a safetensors file; install the 'safetensors' package to read it") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise CheckpointError(f"{path} is a damaged safetensors file ({reason})") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``; ``.safetensors`` too) into a dict; no model is built."""
    path = Path(path)
    _refuse_non_file(path)
    head = _magic(path)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    if _is_safetensors(head):
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).lower()
        if "unsupported global" in text or "unsupported class" in text:
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled objects or code, not only tensors (weights_only=True)"
            ) from None
        if "weights only load failed" in text or "weightsunpickler" in text:
            raise CheckpointError(f"{path} is not a readable checkpoint (not a PyTorch file, or corrupt)") from None
        if not head.startswith((b"PK", b"\x80")):
            raise CheckpointError(f"{path} is not a readable checkpoint (not a PyTorch file, or corrupt)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first[:120]})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to read this checkpoint") from None
    except Exception as exc:  # torch.load raises many types for damaged files
        if not head.startswith((b"PK", b"\x80")):  # neither a zip archive (torch.save) nor a pickle (legacy format)
            raise CheckpointError(f"{path} is not a readable checkpoint (not a PyTorch file, or corrupt)") from None
        reason = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({reason[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a FaceMoE checkpoint (holds a {type(obj).__name__}, expected a state_dict)")
    return obj


def _state_dict_of(obj: Mapping[str, Any], path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any] | None, dict]:
    if obj.get("format") == CHECKPOINT_FORMAT or obj.get("format") in LEGACY_FORMATS:
        for key in ("config", "state_dict"):
            if key not in obj:
                raise CheckpointError(f"{path} is a FaceMoE checkpoint without {key!r}")
        state_dict, config, metadata = obj["state_dict"], obj["config"], obj.get("metadata", {})
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{path}: checkpoint 'config' is a {type(config).__name__}, expected a dict")
        if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
            raise CheckpointError(f"{path}: checkpoint 'state_dict' is not a dict of named tensors")
        return CHECKPOINT_FORMAT, dict(state_dict), dict(config), dict(metadata) if isinstance(metadata, Mapping) else {}
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return "official", dict(inner), None, {}
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return "official", dict(obj), None, {}
    raise CheckpointError(f"{path} is not a FaceMoE checkpoint (no state_dict of tensors found)")


def infer_official_config(state_dict: Mapping[str, torch.Tensor], top_k: int = 2, img_size: int | None = None) -> dict[str, Any]:
    """The ``FaceMoESwin`` keyword arguments that an official state_dict was written by.

    Inferred from keys and shapes: embed dim and patch size (``patch_embed.proj``), input size
    (``absolute_pos_embed`` tokens x patch; else ``img_size`` or 120), depths (blocks per
    stage), heads and window (relative position tables), experts per layer (must agree),
    MLP ratio and embedding size. ``top_k`` is not stored; official default 2.
    """
    required = ("patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table", "feature_layer.2.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointError(f"not an official FaceMoE Swin state_dict: missing key {missing[0]!r}")
    proj = state_dict["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    depths: dict[int, int] = {}
    for key in state_dict:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    stages = sorted(depths)
    if stages != list(range(len(stages))):
        raise CheckpointError(f"official state_dict has non-contiguous stages {stages}")
    num_heads = [state_dict[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in stages]
    table = state_dict["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window_size = (math.isqrt(table) + 1) // 2
    experts: dict[str, int] = {}
    for key in state_dict:
        m = _EXPERT_KEY.match(key)
        if m:
            experts[m.group(1)] = max(experts.get(m.group(1), 0), int(m.group(2)) + 1)
    if not experts:
        raise CheckpointError("official state_dict has no MoE experts (no '*.mlp.experts.N.fc1.weight' keys)")
    first_layer, num_experts = next(iter(experts.items()))
    for layer, n in experts.items():
        if n != num_experts:
            raise CheckpointError(f"mismatched expert counts: {layer} has {n} experts, {first_layer} has {num_experts}")
    hidden = state_dict[f"{first_layer}.experts.0.fc1.weight"].shape[0]
    if "absolute_pos_embed" in state_dict:
        grid = math.isqrt(state_dict["absolute_pos_embed"].shape[1])
        inferred_size = grid * patch_size
        if img_size is not None and img_size != inferred_size:
            raise CheckpointError(f"img_size={img_size} disagrees with absolute_pos_embed ({grid}x{grid} tokens of {patch_size}px = {inferred_size}px)")
        img_size = inferred_size
    if not 1 <= top_k <= num_experts:
        raise CheckpointError(f"top_k={top_k} out of range for a checkpoint with {num_experts} experts")
    return dict(
        img_size=img_size or 120,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=tuple(depths[i] for i in stages),
        num_heads=tuple(num_heads),
        window_size=window_size,
        mlp_ratio=hidden / embed_dim,
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in state_dict,
        ape="absolute_pos_embed" in state_dict,
        num_experts=num_experts,
        top_k=top_k,
        weighting="logits",
        embedding_dim=state_dict["feature_layer.2.weight"].shape[0],
    )


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor the modules of ``model`` hold: parameters, buffers, plain tensor attributes."""
    for prefix, module in model.named_modules():
        for group in (module._parameters, module._buffers, vars(module)):
            for name, value in group.items():
                if isinstance(value, torch.Tensor):
                    yield f"{prefix}.{name}" if prefix else name, value


def _build_to_load(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, bool]:
    """``create_model(name, **kwargs)`` for a checkpoint to overwrite, and whether it was built on
    the meta device (True: no memory and no random initialisation for weights about to be
    replaced; load it with ``assign``). timm's way: built under ``torch.device("meta")``, the
    checkpoint's tensors assigned, then every module's ``init_non_persistent_buffers`` recomputes
    what it derives (Swin's relative position index and window mask). Built as usual instead
    where a module holds a tensor that is not in the state_dict and that it cannot recompute that
    way (a non-persistent buffer without ``init_non_persistent_buffers``, a plain tensor
    attribute), or where its construction needs real values."""
    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
    except Exception:  # a constructor that computes with its parameters' values
        return create_model(name, **kwargs), False
    for module in model.modules():
        unrecomputable = module._non_persistent_buffers_set and not hasattr(module, "init_non_persistent_buffers")
        if unrecomputable or any(isinstance(v, torch.Tensor) for v in vars(module).values()):
            return create_model(name, **kwargs), False
    return model, True


def _own_storage(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as ``dtype`` in a contiguous storage of its own (what ``load_state_dict`` copying
    into fresh parameters gives), without a copy where it already is one."""
    value = value.to(dtype)
    if not value.is_contiguous() or value.untyped_storage().nbytes() != value.numel() * value.element_size():
        value = value.clone(memory_format=torch.contiguous_format)
    return value


def _assign(model: nn.Module, params: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load ``params`` (every persistent key, checked against the model's state_dict ``own``) into
    a model built on the meta device, then recompute its non-persistent buffers on the CPU, each
    module its own (as timm's ``reinit_non_persistent_buffers`` does)."""
    model.load_state_dict({k: _own_storage(v, own[k].dtype) for k, v in params.items()}, strict=True, assign=True)
    for module in model.modules():  # only these hold non-persistent buffers (_build_to_load)
        if hasattr(module, "init_non_persistent_buffers"):
            for key in module._non_persistent_buffers_set:
                buffer = module._buffers.get(key)
                if buffer is not None and buffer.is_meta:
                    module._buffers[key] = torch.empty_like(buffer, device="cpu")
            module.init_non_persistent_buffers()
    left = next((key for key, t in _tensors(model) if t.is_meta), None)
    if left is not None:
        raise CheckpointError(f"{path}: {left} was neither in the checkpoint nor recomputed by its module")


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, *, assign: bool = False) -> None:
    """Load ``state_dict`` into ``model`` with every key and shape checked; the buffers an official
    file stores but our modules derive must equal ours. ``assign``: ``model`` was built on the
    meta device (:func:`_build_to_load`)."""
    own = model.state_dict()
    derived = {k: v for k, v in state_dict.items() if _DERIVED_BUFFERS.search(k) and k not in own}

    def ours(key: str) -> torch.Tensor | None:
        module_name, attr = key.rsplit(".", 1)
        try:
            return getattr(model.get_submodule(module_name), attr)
        except AttributeError:
            raise CheckpointError(f"{path}: unexpected key {key!r} (no such module in this architecture)") from None

    for key, value in derived.items():
        buffer = ours(key)
        if buffer is None or buffer.shape != value.shape:
            raise CheckpointError(f"{path}: buffer {key} disagrees with the architecture (window or shift differ)")
    params = {k: v for k, v in state_dict.items() if k not in derived}
    missing = [k for k in own if k not in params]
    unexpected = [k for k in params if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
        raise CheckpointError(f"{path} does not match the architecture: {'; '.join(parts)}")
    for key, value in params.items():
        if own[key].shape != value.shape:
            raise CheckpointError(f"{path}: shape mismatch at {key}: checkpoint {list(value.shape)}, model {list(own[key].shape)}")
    if assign:
        _assign(model, params, own, path)
    else:
        model.load_state_dict(params, strict=True)
    for key, value in derived.items():
        if not torch.equal(ours(key).to(value.dtype), value):
            raise CheckpointError(f"{path}: buffer {key} disagrees with the architecture (window or shift differ)")


def load_checkpoint(path: str | Path, *, top_k: int | None = None, **overrides: Any) -> nn.Module:
    """Build the model a checkpoint describes and load its weights; returned in ``eval()`` mode.

    Args:
        path: an official ``model.pt`` (bare state_dict) or a checkpoint :func:`save_checkpoint` wrote.
        top_k: experts per token (official files do not store it: default 2).
        overrides: further constructor arguments (e.g. ``weighting="softmax"``).

    The model gets ``checkpoint_path``, ``checkpoint_format`` (``"official"``/``"facemoe"``)
    and ``checkpoint_metadata`` attributes.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    fmt, state_dict, config, metadata = _state_dict_of(obj, path)
    if fmt == "official":
        kwargs = infer_official_config(state_dict, top_k=2 if top_k is None else top_k, img_size=overrides.pop("img_size", None))
        name = "facemoe_swin_official"
    else:
        config = dict(config)
        name = config.pop("name", None)
        if name is None:
            raise CheckpointError(f"{path}: checkpoint config has no model 'name'")
        kwargs = config
        if top_k is not None:
            experts = kwargs.get("num_experts")
            if isinstance(experts, int) and not 1 <= top_k <= experts:
                raise CheckpointError(f"top_k={top_k} out of range for a checkpoint with {experts} experts")
            kwargs["top_k"] = top_k
    kwargs.update(overrides)
    try:
        model, assign = _build_to_load(name, kwargs)
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to build model {name!r} from its config") from None
    except Exception as exc:  # any bad config value (negative sizes raise RuntimeError in torch)
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"{path}: cannot build model {name!r} from its config ({reason})") from None
    try:
        _load_strict(model, state_dict, path, assign=assign)
    except CheckpointError:
        raise
    except Exception as exc:  # e.g. a tensor of a dtype that cannot be copied into a parameter
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"{path}: weights do not load into the model ({reason})") from None
    model.eval()
    model.checkpoint_path = str(path)
    model.checkpoint_format = fmt
    model.checkpoint_metadata = metadata
    return model


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
    *,
    half: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a ``"facemoe"`` checkpoint, atomically.

    ``metadata`` must hold plain types (str, numbers, lists, dicts) so the file loads with
    ``weights_only=True``; ``half=True`` stores floating tensors as float16 (bundled demo);
    ``extra`` adds further top-level entries (optimizer state for resuming).
    """
    config = getattr(model, "model_config", None)
    if not config:
        raise ValueError("model has no model_config; build it with facemoe_model.create_model")
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
        "state_dict": state,
        "metadata": dict(metadata or {}),
        **dict(extra or {}),
    }
    return atomic_path(Path(path), lambda tmp: torch.save(payload, tmp))
