"""Expert activation maps (paper D / E, Figures 6 and 8): per image, per expert, on each MoE layer's grid.

images -> faces (landmarks -> region fractions per token grid) -> forward passes -> maps ->
statistics (:mod:`moescope.stats.maps`, streamed batch by batch) -> :class:`MapsResult` (tables,
figures, the maps of the images the figures show as arrays).

Where each kind of map comes from (nothing is recomputed on the side):

* ``routing`` (top-1 assignment), ``topk`` (membership), ``weight`` (``|w| / sum |w|``) and
  ``prob`` (router probability): the ``hook_routing`` record of every MoE layer
  (:class:`~moescope.trace.RoutingTrace` through :func:`moescope.forward.forward_passes`);
* ``output``: ``‖w_e · expert_e(x)‖`` per token from the layer's ``hook_expert_outputs`` point
  (:class:`ExpertOutputNorms`), 0 where the expert did not run;
* ``gradcam`` / ``input``: :mod:`moescope.attribution` (captum ``LayerGradCam`` on each
  expert's contribution; ``IntegratedGradients`` of the input, shown as the magnitude
  ``sum_c |attr|``) of the score ``cos(model(x), reference)``.

Reference of the gradient maps. The image's own clean embedding is useless at the clean image
(the cosine is at its maximum, its gradient is 0), so: with evaluation data (``cases``) the
probe's gallery mate (mean of the mate's flip-fused gallery embeddings); with an image folder
of identity sub-folders, the mean embedding of the *other* images of the same identity among
those analysed; otherwise (or for an identity with one image) the mean embedding of the other
images analysed. ``settings["reference"]`` says which.

With ``cases`` the images are the probes of a gallery/probe split, labelled ``success`` /
``failure`` by their Rank-1 identification with the first checkpoint
(:func:`facemoe_model.evaluate.mate_ranks` on the same flip-fused embeddings ``moescope eval``
uses), and the concentration numbers are compared between the cases with bootstrap intervals.

Under ``torchrun`` (:mod:`moescope.distributed`) each rank maps a contiguous share of the
images, cut at batch boundaries (the landmark chunks are whole batches, so every batch holds
the images one process would put in it); the region-mass sums are added in rank order, the
per-image concentration rows, ids and kept maps gathered in rank order (= image order), the face
statistics summed, and every rank computes the tables from the same numbers, so the result is
the single-process one (the bootstrap resamples images of the gathered table). The references of the gradient maps and
the evaluation embeddings of ``cases`` are computed sharded and gathered too. Rank 0 alone
shows progress; ``--save-aligned`` views are written by the rank that maps the image. Where
images are dropped (no face, rejected), a single process refills a batch from later images of
its chunk and a rank cannot, so batch composition — and floating-point rounding of batched
matrix products — may differ at float32 precision; counts and discrete maps stay equal.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from facemoe_model.hooks import HookSet
from facemoe_model.inference import eval_mode, model_device
from facemoe_model.moe import ExpertOutputs, select_moe_layers

from .. import distributed
from ..choices import BATCH_SIZE
from ..errors import MoescopeError
from ..faces import PREFETCH_BATCHES, FaceStats, alignment_preparation, chunk_plan, common_root, image_batches, region_preparation
from ..forward import forward_passes
from ..results import AnalysisResult
from ..stats.regions import layer_group
from ..stats.maps import ConcentrationRows, RegionMass, compare_cases, group_maps, routing_maps, shared_scale, token_maps, upsample
from ..trace import compatible_layers
from .regions import checkpoint_labels

__all__ = ["KINDS", "MapsResult", "ExpertOutputNorms", "analyse_maps", "map_passes", "select_paths"]

KINDS = ("routing", "topk", "weight", "prob", "output", "gradcam", "input")
"""Map kinds: four routing maps, expert output norms, Grad-CAM per expert, input attribution."""
_ROUTING_KIND = {"routing": "top1", "topk": "topk", "weight": "weight", "prob": "prob"}
KIND_TEXT = {
    "routing": "top-1 assignment (1 where the expert is the token's first choice)",
    "topk": "top-k membership (1 where the expert is among the token's k)",
    "weight": "normalised combine weight |w| / sum |w| (0 where the expert did not run)",
    "prob": "router probability softmax(logits)",
    "output": "norm of the expert's weighted output ||w_e * expert_e(x)|| per token (0 where it did not run)",
    "gradcam": "Grad-CAM of each expert's contribution (ReLU(sum_c alpha_c A_c), captum LayerGradCam)",
    "input": "Integrated Gradients of the input, magnitude sum_c |attribution| (captum IntegratedGradients)",
}
INTERPOLATION = "bilinear (align_corners=False) from the token grid to the model input"
CASES = ("success", "failure")


@dataclass
class MapsResult(AnalysisResult):
    """An :class:`AnalysisResult` that also carries the maps (kept out of JSON and files).

    The tables cover every analysed image; the arrays only the B images whose maps are kept
    (``keep_maps`` of :func:`analyse_maps`: by default those the figures show), so memory stays
    flat however many images are analysed. ``tables["images"]`` lists all of them.

    Attributes:
        maps: per checkpoint label, per group (layer or stage), ``float64 [B, E, rows, cols]``
            (``input``: ``[B, 1, S, S]`` at the model input).
        image_ids: the B images, in map order.
        images: the B images as the model saw them, ``uint8 [B, S, S, 3]`` (the first
            checkpoint's input, e.g. degraded probes).
        cases: per image ``success`` / ``failure`` (with ``cases``), else None.
    """

    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    image_ids: list[str] = field(default_factory=list)
    images: np.ndarray | None = None
    cases: list[str] | None = None


class ExpertOutputNorms(HookSet):
    """Per token and expert ``‖w_e · expert_e(x)‖`` from each MoE layer's ``hook_expert_outputs``.

    A context manager (hooks removed on exit, also on errors). While it is attached the layers
    pass their per-expert contributions to the point; :meth:`pop` returns, per layer, maps
    ``float64 [B, E, rows, cols]`` of the last forward pass (grid tokens; 0 where the expert
    did not run).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        self.layers = select_moe_layers(model, layers)
        super().__init__({name: layer.hook_expert_outputs for name, layer in self.layers.items()})

    def record(self, name: str, module: nn.Module, inputs: tuple, output: ExpertOutputs) -> None:
        norms = torch.linalg.vector_norm(output.contributions.detach().float(), dim=-1)  # [T, E]
        per_image = norms.reshape(output.batch_size, -1, norms.shape[-1])[:, output.num_prefix_tokens:]
        self._pending[name] = (per_image.cpu().numpy().astype(np.float64), tuple(output.grid))

    def pop(self) -> dict[str, np.ndarray]:
        out, self._pending = self._pending, {}
        return {name: token_maps(values, grid) for name, (values, grid) in out.items()}


# -- images ---------------------------------------------------------------------------------------
def _identity(path: Path) -> str:
    return path.parent.name


def select_paths(paths: Sequence[Path], *, ids: Sequence[str] | None = None, images: int | None = None) -> list[Path]:
    """The images to map: those named by ``ids`` (file name, stem, identity folder or path
    suffix), then at most ``images`` of them, evenly spaced over the sorted list (so the
    bundled demo's first few span different identities)."""
    paths = list(paths)
    if ids:
        chosen, unknown = [], []
        for wanted in ids:
            hits = [p for p in paths if wanted in (p.name, p.stem, _identity(p)) or str(p).endswith(wanted)]
            if not hits:
                unknown.append(wanted)
            chosen.extend(h for h in hits if h not in chosen)
        if unknown:
            raise MoescopeError(f"no image matches --ids {', '.join(unknown)} (give file names, stems or identity folders)")
        paths = chosen
    if images is not None and images < len(paths):
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, images).round().astype(int)]
    if not paths:
        raise MoescopeError("no images to map")
    return paths


def _display(x: torch.Tensor) -> np.ndarray:
    """Model inputs ``[B, 3, S, S]`` in [-1, 1] as ``uint8 [B, S, S, 3]``."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# -- references of the gradient maps ----------------------------------------------------------------
def _embed_paths(model: nn.Module, paths: Sequence[Path], size: int, batch_size: int, align: str) -> dict[str, np.ndarray]:
    """Embeddings (plain forward, no flip) of the images as the model sees them (aligned with
    ``align``); images alignment leaves out (no accepted face: analysed from the template with
    ``region_source="template"``) are embedded as read. Under ``torchrun`` each rank embeds its
    share (:func:`moescope.distributed.shard`) and every rank returns all of them, in the
    single-process order (aligned images in path order, then those embedded as read)."""
    from ..attribution import embed

    device = model_device(model)

    def run(chosen: Sequence[Path], prepare) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for batch in image_batches(chosen, size, [range(len(chosen))], batch_size=batch_size, prepare=prepare):
            out.update(zip(batch.ids, embed(model, batch.images.to(device)).cpu().numpy()))
        return out

    mine = distributed.shard(list(paths), batch_size)
    with eval_mode(model):
        aligned = run(mine, alignment_preparation(size, align=align, stats=FaceStats(), progress=False))
        missing = [p for p in mine if str(p) not in aligned]
        as_read = run(missing, None) if missing else {}
    pieces = distributed.gather((aligned, as_read))
    out: dict[str, np.ndarray] = {}
    for part in (0, 1):
        for piece in pieces:
            out.update(piece[part])
    return out


def _folder_references(embeddings: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """Per image: mean embedding of its identity's other images, else of all the other images."""
    ids = list(embeddings)
    identities = {i: Path(i).parent.name for i in ids}
    use_identities = len({str(Path(i).parent) for i in ids}) > 1
    if len(ids) < 2:
        raise MoescopeError("gradient maps need at least two images: the score's reference is the mean embedding of the other images")
    unit = np.stack([embeddings[i] for i in ids])
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    # the mean of the others as (sum - own) / (count - 1): linear in the number of images
    total = unit.sum(0)
    members: dict[str, list[int]] = {}
    for n, i in enumerate(ids):
        members.setdefault(identities[i], []).append(n)
    identity_sums = {name: unit[index].sum(0) for name, index in members.items()}
    refs, mates_used = {}, 0
    for n, i in enumerate(ids):
        count = len(members[identities[i]])
        if use_identities and count > 1:
            mates_used += 1
            refs[i] = (identity_sums[identities[i]] - unit[n]) / (count - 1)
        else:
            refs[i] = (total - unit[n]) / (len(ids) - 1)
    how = ("mean embedding of the other analysed images of the same identity (folder), "
           "else of all other analysed images") if use_identities else "mean embedding of the other analysed images (no identities)"
    return refs, f"{how}; {mates_used} of {len(ids)} images had an identity mate"


# -- evaluation cases -----------------------------------------------------------------------------
def _split_from_folder(folder: Path, size: int):
    """A gallery/probe split of ``folder``: its own gallery/ + probe/ folders, or, for a folder of
    identity sub-folders, the first image (sorted) of each identity with >= 2 images as the
    gallery and the others as probes."""
    from facemoe_model.data.datasets import GalleryProbe, LabelledImages, gallery_probe_split
    from facemoe_model.data.images import list_images

    if (folder / "gallery").is_dir() and (folder / "probe").is_dir():
        return gallery_probe_split(folder, size)
    by_identity: dict[str, list[Path]] = {}
    for path in list_images(folder):
        by_identity.setdefault(path.parent.name, []).append(path)
    kept = {k: sorted(v) for k, v in sorted(by_identity.items()) if len(v) >= 2}
    if len(kept) < 2:
        raise MoescopeError(f"{folder}: --cases needs a gallery/probe split or identity folders (>= 2 identities with >= 2 images)")
    classes = list(kept)
    gallery = [(v[0], c) for c, v in enumerate(kept.values())]
    probe = [(p, c) for c, v in enumerate(kept.values()) for p in v[1:]]
    return GalleryProbe(LabelledImages(gallery, classes, folder, size), LabelledImages(probe, classes, folder, size))


@dataclass
class _Cases:
    paths: list[Path]
    case: dict[str, str]
    rank: dict[str, int]
    identity: dict[str, str]
    references: list[dict[str, np.ndarray]]  # per model: probe id -> gallery-mate embedding (gradient kinds)
    rank1: float


def _evaluation_cases(models, split, *, batch_size: int, flip: bool, probe_transform, want_references: bool, per_case: int | None) -> _Cases:
    from facemoe_model.evaluate import mate_ranks
    from facemoe_model.protocols import EmbeddingCache

    probes = [Path(p) for p in split.probe.sources]
    labels = np.asarray(split.probe.labels)
    references = []
    ranks = None
    for index, model in enumerate(models):
        if index > 0 and not want_references:
            break
        cache = EmbeddingCache(model, batch_size=batch_size, flip=flip)
        probe_emb, gallery_emb = cache(split.probe, probe_transform), cache(split.gallery)
        gallery_labels = np.asarray(split.gallery.labels)
        if index == 0:
            ranks = mate_ranks(probe_emb, labels, gallery_emb, gallery_labels)
        if want_references:
            refs = {}
            for p, label in zip(probes, labels):
                mate = gallery_emb[gallery_labels == label].mean(0)
                refs[str(p)] = mate / np.linalg.norm(mate)
            references.append(refs)
    case = {str(p): CASES[0] if r == 1 else CASES[1] for p, r in zip(probes, ranks)}
    chosen = []
    for name in CASES:
        members = [p for p in probes if case[str(p)] == name]
        if per_case is not None and per_case < len(members):
            members = [members[i] for i in np.linspace(0, len(members) - 1, per_case).round().astype(int)]
        chosen += members
    return _Cases(
        paths=chosen, case=case, rank={str(p): int(r) for p, r in zip(probes, ranks)},
        identity={str(p): split.probe.classes[label] for p, label in zip(probes, labels)},
        references=references, rank1=float((ranks == 1).mean()),
    )


# -- the analysis ---------------------------------------------------------------------------------
class _KeptMaps:
    """The maps (and model views) of the images the figures show: the first ``keep`` images, and
    with cases the first ``keep`` of each case. Everything else about an image is reduced to
    sums and table rows as its batch passes, so memory does not grow with the image count."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.seen, self.seen_case = 0, {}
        self.ids: list[str] = []
        self.cases: list[str] = []
        self.images: list[np.ndarray] = []
        self.maps: dict[str, dict[str, list[np.ndarray]]] = {}

    def select(self, count: int, cases: Sequence[str] | None) -> list[int]:
        """Which of the next ``count`` images (with their ``cases``) to keep."""
        chosen = []
        for k in range(count):
            case = cases[k] if cases else None
            in_case = case is not None and self.seen_case.get(case, 0) < self.keep
            if self.seen < self.keep or in_case:
                chosen.append(k)
            self.seen += 1
            if case is not None:
                self.seen_case[case] = self.seen_case.get(case, 0) + 1
        return chosen

    def append(self, index: list[int], ids, cases, images: np.ndarray, maps: dict[str, dict[str, np.ndarray]]) -> None:
        """Keep images ``index`` of a batch (``images``: the kept ones' views already)."""
        self.ids += [ids[k] for k in index]
        self.cases += [cases[k] for k in index] if cases else []
        self.images.append(images)
        for label, grouped in maps.items():
            for group, m in grouped.items():
                self.maps.setdefault(label, {}).setdefault(group, []).append(m[index])

    def arrays(self) -> dict[str, dict[str, np.ndarray]]:
        return {label: {g: np.concatenate(parts) for g, parts in grouped.items()} for label, grouped in self.maps.items()}

    @classmethod
    def joined(cls, parts: Sequence["_KeptMaps"]) -> "_KeptMaps":
        """The ranks' kept maps in rank (= image) order, selected again as one process would."""
        out = cls(parts[0].keep)
        for part in parts:
            if not part.ids:
                continue
            maps = part.arrays()
            index = out.select(len(part.ids), part.cases or None)
            if index:
                out.append(index, part.ids, part.cases or None, np.concatenate(part.images)[index], maps)
        return out


def map_passes(
    models: Sequence[nn.Module], batches, kinds: Sequence[str], layers: Sequence[str] | None = None
):
    """Forward passes that produce routing and output maps: per batch ``(batch, per model {kind:
    {layer: [B, E, rows, cols]}})`` for ``kinds`` among ``routing, topk, weight, prob, output``
    (routing from the ``hook_routing`` record, output from ``hook_expert_outputs``). A generator;
    hooks are removed when it finishes or is closed."""
    unknown = [k for k in kinds if k not in _ROUTING_KIND and k != "output"]
    if unknown:
        raise ValueError(f"map_passes makes routing and output maps, not {', '.join(unknown)}")
    routing_kinds = [k for k in kinds if k in _ROUTING_KIND]
    with contextlib.ExitStack() as stack:
        outputs = [stack.enter_context(ExpertOutputNorms(m, layers)) for m in models] if "output" in kinds else None
        steps = stack.enter_context(contextlib.closing(forward_passes(models, batches, routing=bool(routing_kinds), layers=layers,
                                                                              prefetch=PREFETCH_BATCHES)))
        for step in steps:
            per_model = []
            for index, model_pass in enumerate(step.passes):
                maps = {k: {n: routing_maps(r, _ROUTING_KIND[k]) for n, r in model_pass.routing.items()} for k in routing_kinds}
                if outputs is not None:
                    maps["output"] = outputs[index].pop()
                per_model.append(maps)
            yield step.batch, per_model


def _gradient_maps(model, kind, x, reference, names, ig_steps) -> dict[str, np.ndarray]:
    from ..attribution import CosineScore, ExpertTap, expert_gradcam, input_attribution

    device = model_device(model)
    x, reference = x.to(device), reference.to(device)
    score = CosineScore(model)
    with eval_mode(model):
        if kind == "input":
            out = input_attribution(score, x, args=(reference,), n_steps=ig_steps)
            return {"input": out.pixel_map("abs")[:, None].cpu().numpy().astype(np.float64)}
        return {
            name: expert_gradcam(score, x, ExpertTap.for_moe_layer(model.get_submodule(name)), args=(reference,)).cpu().numpy().astype(np.float64)
            for name in names
        }


def analyse_maps(
    models: Sequence[nn.Module],
    specs: Sequence[str],
    paths: Sequence[Path] | None = None,
    *,
    kind: str = "routing",
    layers: Sequence[str] | None = None,
    by: str = "stage",
    cases: bool = False,
    split=None,
    probe_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    per_case: int | None = None,
    region_source: str = "landmarks",
    align: str = "auto",
    save_aligned: str | None = None,
    batch_size: int = BATCH_SIZE,
    flip: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    rows: int = 4,
    ig_steps: int = 32,
    figure_group: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    data: str = "",
    keep_maps: int | None = None,
) -> MapsResult:
    """Expert activation maps of ``kind`` for one model, or two side by side (``--compare``).

    Without ``cases``: the images ``paths`` (choose them with :func:`select_paths`). With
    ``cases``: the probes of ``split`` (a :class:`~facemoe_model.data.datasets.GalleryProbe`),
    ``per_case`` of each case at most (evenly spaced; default all), probes degraded by
    ``probe_transform`` (landmarks found and faces aligned (``align``) on the clean probe). Maps are averaged over each
    group's layers (``by``: ``layer`` or ``stage``). Returns a :class:`MapsResult` with tables
    ``region_mass``, ``concentration``, ``images`` (and ``cases``), a Figure 6 layout ``maps``
    (the first ``rows`` images, of ``figure_group``: default the first group) and with
    ``cases`` a Figure 8 layout ``maps_cases`` (``rows`` images per case).

    The statistics stream: each batch's maps are reduced to region-mass sums and concentration
    rows as it passes; ``result.maps`` holds the first ``keep_maps`` images (and with ``cases``
    the first ``keep_maps`` of each case; default and at least ``rows``, what the figures show).
    Pass ``keep_maps=len(paths)`` for every image's maps (``8 * E * rows * cols`` bytes per image,
    group and checkpoint).
    """
    if kind not in KINDS:
        raise MoescopeError(f"unknown map kind {kind!r}; use one of {', '.join(KINDS)}")
    if by not in ("layer", "stage"):
        raise MoescopeError(f"unknown grouping {by!r}; use layer or stage")
    labels = checkpoint_labels(specs)
    chosen, num_experts, size = compatible_layers(models, labels, layers)
    names = list(chosen)
    grids = [layer.token_grid for layer in chosen.values()]
    gradient = kind in ("gradcam", "input")
    planned = ["input"] if kind == "input" else list(dict.fromkeys(layer_group(n, by) for n in names))
    if figure_group is not None and figure_group not in planned:
        raise MoescopeError(f"no maps for group {figure_group!r}; available: {', '.join(planned)}")

    # which images, and the reference of the gradient maps
    case_info = None
    reference_text = None
    if cases:
        if split is None:
            raise MoescopeError("--cases needs evaluation data with identities (a gallery/probe split)")
        case_info = _evaluation_cases(models, split, batch_size=batch_size, flip=flip, probe_transform=probe_transform,
                                      want_references=gradient, per_case=per_case)
        paths = case_info.paths
        references = case_info.references
        reference_text = "the probe's gallery mate (mean of its identity's flip-fused gallery embeddings)"
    else:
        if not paths:
            raise MoescopeError("no images to map")
        paths = list(paths)
        references = []
        if gradient:
            for model in models:
                refs, reference_text = _folder_references(_embed_paths(model, paths, size, batch_size, align))
                references.append(refs)

    stats = FaceStats()
    progress = progress and distributed.is_main()
    # --save-aligned: each rank writes the views of its images, named relative to the folder of all of them
    prepare = region_preparation(grids, size, region_source=region_source, stats=stats, workers=workers, progress=progress,
                                 align=align, save_aligned=save_aligned, save_root=common_root(paths) if save_aligned else None)
    if probe_transform is not None and cases:
        base_prepare = prepare
        prepare = lambda loaded: [(i, probe_transform(im), f) for i, im, f in base_prepare(loaded)]  # noqa: E731
    # torchrun: this rank's contiguous share of whole batches; landmark chunks of whole batches,
    # so (without dropped images) every batch is the one a single process would make
    mine = distributed.shard(paths, batch_size)
    batches = image_batches(mine, size, chunk_plan(len(mine), batch_size), batch_size=batch_size, prepare=prepare, stats=stats)

    # streaming: region-mass sums per checkpoint (and case), per-image concentration rows; the
    # maps themselves only of the images the figures show
    image_case = (lambda batch_ids: [case_info.case[i] for i in batch_ids]) if case_info else (lambda batch_ids: None)
    mass_sums = {(label, case): RegionMass() for label in labels for case in ("all", *(CASES if case_info else ()))}
    concentration_rows = {label: ConcentrationRows() for label in labels}
    ids: list[str] = []
    kept = _KeptMaps(rows if keep_maps is None else max(keep_maps, rows))

    def on_grid(grouped: dict[str, np.ndarray], fractions: dict[tuple[int, int], np.ndarray]) -> dict[str, np.ndarray]:
        """Input maps pooled onto the finest token grid for the region numbers."""
        if kind != "input":
            return grouped
        finest = max(fractions, key=lambda g: g[0] * g[1])
        return {g: F.adaptive_avg_pool2d(torch.from_numpy(m), finest).numpy() for g, m in grouped.items()}

    def collect(batch, label_maps: list[dict[str, np.ndarray]]) -> None:
        ids.extend(batch.ids)
        cases_here = image_case(batch.ids)
        grouped_maps = {}
        for label, maps in zip(labels, label_maps):
            grouped = maps if kind == "input" else group_maps(maps, by)
            grouped_maps[label] = grouped
            stat_maps = on_grid(grouped, batch.fractions)
            mass_sums[label, "all"].add(stat_maps, batch.fractions)
            for case in CASES if cases_here else ():
                index = [k for k, c in enumerate(cases_here) if c == case]
                if index:
                    mass_sums[label, case].add({g: m[index] for g, m in stat_maps.items()}, {g: f[index] for g, f in batch.fractions.items()})
            concentration_rows[label].add(stat_maps, batch.fractions, batch.ids)
        index = kept.select(len(batch.ids), cases_here)
        if index:
            kept.append(index, batch.ids, cases_here, _display(batch.images[index]), grouped_maps)

    if gradient:
        for batch in batches:
            label_maps = []
            for model, refs in zip(models, references):
                ref = torch.from_numpy(np.stack([refs[i] for i in batch.ids])).float()
                label_maps.append(_gradient_maps(model, kind, batch.images, ref, names, ig_steps))
            collect(batch, label_maps)
    else:
        for batch, label_maps in map_passes(models, batches, (kind,), names):
            collect(batch, [kinds[kind] for kinds in label_maps])

    # torchrun: every rank's images in rank (= image) order, the sums and face statistics summed
    distributed.reduce_stats(stats)
    for sums in mass_sums.values():
        distributed.reduce_region_mass(sums)
    if distributed.world_size() > 1:
        pieces = distributed.gather((ids, concentration_rows, kept))
        ids = [i for p in pieces for i in p[0]]
        concentration_rows = {label: ConcentrationRows.joined([p[1][label] for p in pieces]) for label in labels}
        kept = _KeptMaps.joined([p[2] for p in pieces])

    if stats.analysed == 0:
        raise MoescopeError(
            f"no image could be analysed: {stats.found} found, {len(stats.no_face)} without a face, "
            f"{len(stats.unreadable)} unreadable (try --region-source template)"
        )
    maps = kept.arrays()
    images = np.concatenate(kept.images)
    shown_ids, shown_case = kept.ids, kept.cases if case_info else None
    all_cases = image_case(ids)

    mass_frames = [sums.table().assign(checkpoint=label, case=case, images=sums.images)
                   for (label, case), sums in mass_sums.items() if sums.images]
    concentration = pd.concat([concentration_rows[label].table().assign(checkpoint=label) for label in labels], ignore_index=True)
    identity_of = (lambda i: case_info.identity[i]) if case_info else (lambda i: Path(i).parent.name)
    image_table = pd.DataFrame({"image": ids, "identity": [identity_of(i) for i in ids]})
    if case_info:
        image_table["case"] = all_cases
        image_table["mate_rank"] = [case_info.rank[i] for i in ids]
        concentration["case"] = concentration["image"].map(dict(zip(ids, all_cases)))
    tables: dict[str, pd.DataFrame] = {
        "region_mass": pd.concat(mass_frames, ignore_index=True)[["checkpoint", "case", "images", "group", "region", "expert", "mass", "region_tokens"]],
        "concentration": concentration,
        "images": image_table,
    }
    summary: dict[str, Any] = {**stats.summary(region_source), "num_experts": num_experts, "moe_layers": len(names),
                               "groups": list(maps[labels[0]])}
    if case_info:
        compared = []
        for label in labels:
            part = concentration[concentration["checkpoint"] == label]
            compared.append(compare_cases(part, cases=CASES, n_boot=n_boot, seed=seed).assign(checkpoint=label))
        tables["cases"] = pd.concat(compared, ignore_index=True)
        counts = pd.Series(all_cases).value_counts()
        summary.update({"rank1_all_probes": case_info.rank1, "images_success": int(counts.get("success", 0)),
                        "images_failure": int(counts.get("failure", 0))})
        summary["failure_minus_success"] = _headline(tables["cases"])

    groups = list(maps[labels[0]])
    group = figure_group or groups[0]
    if group not in groups:
        raise MoescopeError(f"no maps for group {group!r}; available: {', '.join(groups)}")
    figures = {"maps": lambda: _figure6(maps, labels, group, images, shown_ids, rows, kind, shown_case)}
    if case_info:
        figures["maps_cases"] = lambda: _figure8(maps[labels[0]][group], images, shown_ids, shown_case, rows, kind, group, labels[0], case_info)

    settings = {
        "labels": labels, "specs": list(specs), "data": data, "kind": kind, "map": KIND_TEXT[kind], "by": by,
        "layers": "all" if layers is None else list(layers), "region_source": region_source, "align": align, "interpolation": INTERPOLATION,
        "colour_scale": "shared by every map of a figure (not per-map min-max)", "figure_group": group,
        "region_mass": "sum_b sum_n frac[b,r,n] map[b,e,n] / sum_b sum_n frac[b,r,n] (mean map value per region token)",
        "bootstrap": n_boot, "seed": seed, "cases": bool(cases),
    }
    if gradient:
        settings["reference"] = reference_text
        settings["score"] = "cosine similarity of the embedding to the reference"
        settings["cost"] = (f"{len(names) * num_experts} forward+backward passes per batch and checkpoint (one per layer and expert)"
                            if kind == "gradcam" else f"{ig_steps} forward+backward passes per image (Integrated Gradients, Gauss-Legendre)")
    if case_info:
        settings["case_rule"] = (f"Rank-1 identification of each probe by {labels[0]} (flip={'on' if flip else 'off'}; "
                                 "split images embedded as given, as `moescope eval --split` does)")
    return MapsResult(
        command="maps",
        checkpoints=[getattr(m, "checkpoint_path", s) for m, s in zip(models, specs)],
        settings=settings, tables=tables, summary=summary, warnings=stats.warnings(), figures=figures,
        maps=maps, image_ids=shown_ids, images=images, cases=shown_case,
    )


def _headline(cases_table: pd.DataFrame) -> list[dict]:
    """failure - success differences of each metric per checkpoint, group and expert (with interval)."""
    diff = cases_table[cases_table["case"] == "failure - success"]
    return [
        {k: row[k] for k in ("checkpoint", "group", "expert", "metric", "mean", "ci_low", "ci_high")}
        for _, row in diff.iterrows()
    ]


def _short(image_id: str) -> str:
    p = Path(image_id)
    return f"{p.parent.name}/{p.stem}"


def _figure6(maps, labels, group, images, ids, rows, kind, image_case):
    from ..plotting import expert_maps_figure

    n = min(rows, len(ids))
    size = images.shape[1:3]
    panels = {label: upsample(maps[label][group][:n], size) for label in labels}
    vmin, vmax = shared_scale(panels.values())
    names = [f"{_short(i)}" + (f" ({image_case[k]})" if image_case else "") for k, i in enumerate(ids[:n])]
    title = f"expert maps [{group}]: {kind}" + (f" — {' vs '.join(labels)}" if len(labels) > 1 else f" — {labels[0]}")
    return expert_maps_figure(images[:n], panels, row_labels=names, vmin=vmin, vmax=vmax, title=title,
                              expert_names=None if kind == "input" else [f"expert {e}" for e in range(panels[labels[0]].shape[1])])


def _figure8(group_maps_, images, ids, image_case, rows, kind, group, label, case_info):
    from ..plotting import expert_cases_figure

    size = images.shape[1:3]
    sections = {}
    for case in CASES:
        index = [k for k, c in enumerate(image_case) if c == case][:rows]
        if not index:
            continue
        sections[case] = (images[index], upsample(group_maps_[index], size),
                          [f"{_short(ids[k])} rank {case_info.rank[ids[k]]}" for k in index])
    vmin, vmax = shared_scale(m for _, m, _ in sections.values())
    title = f"{label} [{group}]: {kind} maps of probes identified correctly (success) and wrongly (failure) at Rank-1"
    return expert_cases_figure(sections, vmin=vmin, vmax=vmax, title=title,
                               expert_names=None if kind == "input" else [f"expert {e}" for e in range(group_maps_.shape[1])])
