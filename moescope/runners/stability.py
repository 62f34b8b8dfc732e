"""Routing stability under attacks and degradations of the probes (paper B.16, B.10, B.3; issue 12).

evaluation data -> the probe side (the split's probes; without a split the second image of
each verification pair), in batches: decode, Face Mesh landmarks (cached; the aligned-face
template where none is found) -> region fractions per token grid -> the clean forward pass
(embeddings + routing, :func:`moescope.forward.forward_passes`) -> for each setting the
perturbed probes (an attack of :mod:`moescope.attacks` on the [0, 1] image, or a
:class:`ProbeDegradation` of the uint8 image) and their forward pass -> streaming statistics:
routing change per layer (:class:`moescope.stats.agreement.RoutingChange`, 1 - IoU of the
top-k index sets, never the raw-logit weights), the same per facial region, expert usage ->
identification (Rank-k against the clean gallery) and verification (every probe-side image of
a pair replaced by its perturbed version; gallery images stay clean) per setting.

Settings run inside the batch loop (clean pass once per batch), so memory holds one batch of
images plus, per setting, one embedding per probe and a few counters: flat over many probes.
Attack steps free their graph (``run_attack``); routing is captured as detached numpy. The next
batches are decoded, looked up and pooled in a prefetch thread (:func:`moescope.forward.prefetched`)
while the model runs; :func:`~moescope.forward.forward_passes` hands the free heap back every
``HAND_BACK_EVERY_S`` seconds across its calls (about every batch here).

Under ``torchrun`` (:mod:`moescope.distributed`) each rank perturbs a contiguous share of the
probe batches (the batches are those of one process: same images, same global start index,
so the PGD / MIM random starts, seeded ``seed + start``, and the noise, seeded per global
probe index, are the single-process ones); the gallery and the verification pairs' other
images are embedded sharded (:func:`facemoe_model.evaluate.embed_dataset`). At the end each
setting's routing-change and region sums and expert-usage counts are summed over the ranks
(counts exactly) and the probe embeddings and attack norms gathered in rank (= probe) order,
so every rank computes the single-process tables; rank 0 alone shows progress. Only
``summary["seconds"]`` (wall-clock time) differs.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from facemoe_model.data.images import decode_image, normalise, read_image, to_unit_tensor
from facemoe_model.data.transforms import DownUp, GaussianBlur, GaussianNoise, JpegCompression
from facemoe_model.evaluate import identification_metrics, verification_metrics
from facemoe_model.protocols import EmbeddingCache, EvaluationData
from facemoe_model.rows import RowBuffer

from .. import distributed
from ..attacks import AttackSetting, EmbeddingModel, get_loss, reference_embeddings, run_attack
from ..choices import EVAL_BATCH_SIZE
from ..errors import DataError, MoescopeError
from ..faces import PREFETCH_BATCHES
from ..forward import forward_passes, prefetched
from ..landmarks import detect_landmarks, template_landmarks
from ..occlusion import RegionOcclusion
from ..regions import REGIONS, pool_labels_to_grids, region_labels
from ..results import AnalysisResult
from ..stats.agreement import RoutingChange, routing_set_distance, top1_changed
from ..stats.usage import usage_table
from ..trace import LayerRouting, expert_count, select_layers

__all__ = [
    "DEGRADATIONS",
    "CLEAN",
    "ProbeDegradation",
    "degradation_grid",
    "RegionRoutingChange",
    "attack_stability",
    "degradation_stability",
    "probe_stability",
    "eps_label",
]

CLEAN = "clean"
DEGRADATIONS: dict[str, str] = {
    "blur": "blur sigma (px)",
    "jpeg": "JPEG quality",
    "noise": "noise sigma (0..255)",
    "resolution": "resolution (px)",
    "occlude": "occluded region",
}
"""The degradation kinds and the name of their parameter (the x axis of their figure)."""


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeDegradation:
    """One degradation of the probe images (RGB uint8 -> RGB uint8), from
    :mod:`facemoe_model.data.transforms` or :class:`moescope.occlusion.RegionOcclusion`.

    ``blur``: Gaussian sigma in px (0: identity); ``jpeg``: quality 1..100; ``noise``: Gaussian
    std in grey levels (seeded per probe); ``resolution``: area-down to S x S px, bicubic back up
    (``--lowres S``); ``occlude``: a facial region set to grey (from the probe's landmarks).
    """

    kind: str
    value: Union[float, int, str]

    def __post_init__(self) -> None:
        if self.kind not in DEGRADATIONS:
            raise MoescopeError(f"unknown degradation {self.kind!r}; choose {', '.join(DEGRADATIONS)}")
        self.transform()  # validates the value (one-line InputError)

    def transform(self):
        if self.kind == "blur":
            return GaussianBlur(float(self.value))
        if self.kind == "jpeg":
            return JpegCompression(int(self.value))
        if self.kind == "resolution":
            return DownUp(int(self.value), interpolation="bicubic")
        if self.kind == "occlude":
            return RegionOcclusion(str(self.value))
        if float(self.value) < 0:
            raise MoescopeError(f"noise sigma must be >= 0, got {self.value}")
        return None  # noise: built per probe with its own seed

    @property
    def label(self) -> str:
        unit = {"blur": "sigma=", "jpeg": "q=", "noise": "sigma=", "resolution": "", "occlude": ""}[self.kind]
        suffix = "px" if self.kind == "resolution" else ""
        return f"{self.kind} {unit}{self.value:g}{suffix}" if not isinstance(self.value, str) else f"{self.kind} {self.value}"

    def apply(self, images: list[np.ndarray], landmarks: list[np.ndarray], seeds: Sequence[int]) -> list[np.ndarray]:
        """The degraded copies of ``images`` (``seeds``: one per image, for the noise)."""
        if self.kind == "noise":
            return [GaussianNoise(float(self.value), rng=int(s))(im) for im, s in zip(images, seeds)]
        transform = self.transform()
        if self.kind == "occlude":
            return [transform(im, lm) for im, lm in zip(images, landmarks)]
        return [transform(im) for im in images]


Setting = Union[AttackSetting, ProbeDegradation]


def degradation_grid(
    blur: Sequence[float] = (), jpeg: Sequence[int] = (), noise: Sequence[float] = (),
    resolution: Sequence[int] = (), occlude: Sequence[str] = (),
) -> list[ProbeDegradation]:
    """The settings of each kind, in the order given (kinds in :data:`DEGRADATIONS` order)."""
    grid = {"blur": blur, "jpeg": jpeg, "noise": noise, "resolution": resolution, "occlude": occlude}
    return [ProbeDegradation(kind, value) for kind, values in grid.items() for value in values]


def eps_label(eps: float) -> str:
    """``8/255`` for budgets on the grey-level grid, else the decimal."""
    grey = eps * 255
    return f"{round(grey):d}/255" if abs(grey - round(grey)) < 1e-6 else f"{eps:g}"


def _attack_label(s: AttackSetting) -> str:
    extra = "" if s.attack == "fgsm" else f" {s.steps} steps"
    return f"{s.attack.upper()} {s.norm} eps={eps_label(s.eps)}{extra}"


def _describe(setting: Setting | None) -> dict:
    """The identifying columns of a setting's row."""
    if setting is None:
        return {"setting": CLEAN, "family": CLEAN, "parameter": "", "value": None}
    if isinstance(setting, AttackSetting):
        return {"setting": _attack_label(setting), "family": setting.attack, "parameter": f"eps ({setting.norm}, x255)",
                "value": setting.eps * 255}
    return {"setting": setting.label, "family": setting.kind, "parameter": DEGRADATIONS[setting.kind], "value": setting.value}


# --- statistics over facial regions -------------------------------------------------------------


class RegionRoutingChange:
    """Streaming routing change per MoE layer and facial region: each token's set distance and
    top-1 change weighted by the share of the token's cell the region covers.

    ``update(reference, changed, fractions)`` with both routings of a batch and the region
    fractions ``{grid: [B, R, rows, cols]}``; ``to_frame()``: ``layer, region, weight`` (token
    equivalents) ``, set_distance, top1_changed``, plus ``layer == "all"`` over every layer.
    """

    def __init__(self, regions: Sequence[str] = REGIONS) -> None:
        self.regions = list(regions)
        self._sums: dict[str, np.ndarray] = {}  # layer -> [3, R]: weight, weighted distance, weighted top-1 change

    def update(self, reference: dict[str, LayerRouting], changed: dict[str, LayerRouting], fractions: dict) -> None:
        for name, ra in reference.items():
            rb = changed[name]
            frac = np.asarray(fractions[tuple(ra.grid)], dtype=np.float64).reshape(ra.topk.shape[0], len(self.regions), -1)
            distance = routing_set_distance(ra.topk, rb.topk, max(ra.num_experts, rb.num_experts))
            flipped = top1_changed(ra.topk, rb.topk).astype(np.float64)
            sums = self._sums.setdefault(name, np.zeros((3, len(self.regions))))
            sums += np.stack([frac.sum((0, 2)), np.einsum("brn,bn->r", frac, distance), np.einsum("brn,bn->r", frac, flipped)])

    def to_frame(self) -> pd.DataFrame:
        items = list(self._sums.items())
        if items:
            items.append(("all", np.sum([s for _, s in items], axis=0)))
        rows = []
        for layer, s in items:
            for r, region in enumerate(self.regions):
                w = s[0, r]
                rows.append({"layer": layer, "region": region, "weight": w,
                             "set_distance": s[1, r] / w if w > 0 else float("nan"),
                             "top1_changed": s[2, r] / w if w > 0 else float("nan")})
        return pd.DataFrame(rows, columns=["layer", "region", "weight", "set_distance", "top1_changed"])


# --- the probe side -----------------------------------------------------------------------------


def _key(source) -> object:
    return os.path.normpath(os.path.abspath(str(source))) if isinstance(source, (str, Path)) else bytes(source)


def _decode(source) -> np.ndarray:
    if isinstance(source, (str, Path)):
        return read_image(source)
    image = decode_image(bytes(source))
    if image is None:
        raise DataError("an encoded probe image no longer decodes")
    return image


@dataclass
class _Probes:
    sources: list
    labels: np.ndarray | None
    total: int


def _probe_side(data: EvaluationData, max_probes: int | None) -> _Probes:
    """The probe images (split probes, else each pair's second image), subsampled round-robin
    over identities (the first probe of every identity, then the second ...) to ``max_probes``."""
    if data.split is not None:
        sources, labels = list(data.split.probe.sources), np.asarray(data.split.probe.labels)
    elif data.pairs is not None:
        second = sorted(set(int(i) for i in data.pairs.pairs[:, 1]))
        sources, labels = [data.pairs.sources[i] for i in second], None
    else:
        raise DataError("no evaluation protocol in the data")
    total = len(sources)
    if max_probes is not None and max_probes < total:
        if labels is not None:
            seen: dict[int, int] = {}
            rank = []
            for label in labels:  # the how-manieth probe of its identity
                rank.append(seen.get(int(label), 0))
                seen[int(label)] = rank[-1] + 1
            order = sorted(range(total), key=lambda i: (rank[i], i))[:max_probes]
        else:
            order = list(range(max_probes))
        order = sorted(order)
        sources = [sources[i] for i in order]
        labels = labels[order] if labels is not None else None
    return _Probes(sources, labels, total)


def _landmarks(images: list[np.ndarray], workers: int | None) -> tuple[list[np.ndarray], int]:
    found = detect_landmarks(images, workers=workers, progress=False)
    out, templated = [], 0
    for image, lm in zip(images, found):
        if lm is None:
            templated += 1
            lm = template_landmarks(*image.shape[:2])
        out.append(np.asarray(lm))
    return out, templated


def _fractions(images: list[np.ndarray], landmarks: list[np.ndarray], grids: list[tuple[int, int]], size: int) -> dict:
    pooled = [pool_labels_to_grids(region_labels(lm, *im.shape[:2]), grids, input_hw=(size, size))
              for im, lm in zip(images, landmarks)]
    return {g: np.stack([p[g] for p in pooled]) for g in grids}


def _first(routing: LayerRouting, n: int) -> LayerRouting:
    return dataclasses.replace(routing, topk=routing.topk[:n], weights=routing.weights[:n], probs=routing.probs[:n],
                               logits=routing.logits[:n])


def _forward(model: nn.Module, x01: torch.Tensor, flip: bool, layers) -> tuple[np.ndarray, dict[str, LayerRouting]]:
    """Flip-fused L2-normalised embeddings ``[B, D]`` and the routing of the images themselves."""
    x = normalise(x01)
    n = len(x)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    (step,) = list(forward_passes([model], [x], layers=layers))
    out = step.passes[0].outputs.float()
    emb = out[:n] + out[n:] if flip else out
    return F.normalize(emb, dim=1).cpu().numpy(), {k: _first(r, n) for k, r in step.passes[0].routing.items()}


# --- the runner ---------------------------------------------------------------------------------


ATTACK_VALUES = ("loss_before", "loss_after", "linf", "l2")
"""The per-probe values an attack setting keeps (:class:`~moescope.attacks.AttackOutcome` fields)."""


@dataclass
class _Acc:
    """What one setting accumulates over the probes (per-probe rows in :class:`RowBuffer` blocks)."""

    change: RoutingChange = dataclasses.field(default_factory=RoutingChange)
    regions: RegionRoutingChange = dataclasses.field(default_factory=RegionRoutingChange)
    counts: dict = dataclasses.field(default_factory=dict)
    embeddings: RowBuffer = dataclasses.field(default_factory=RowBuffer)
    attack: dict[str, RowBuffer] = dataclasses.field(default_factory=lambda: {k: RowBuffer() for k in ATTACK_VALUES})

    def state(self) -> tuple:
        """What :func:`_reduce` sums / gathers over the ranks."""
        return (self.change._sums, self.regions._sums, self.counts, self.embeddings.array,
                {k: v.array for k, v in self.attack.items()})

    def update(self, clean: dict, routing: dict, fractions: dict, embeddings: np.ndarray) -> None:
        self.change.update(clean, routing)
        self.regions.update(clean, routing, fractions)
        for name, r in routing.items():
            added = np.bincount(r.topk.reshape(-1), minlength=r.num_experts)
            self.counts[name] = self.counts.get(name, 0) + added
        self.embeddings.append(embeddings)


def _summed(parts: Sequence[dict]) -> dict:
    """``name -> array`` dicts of the ranks summed (names in order of first appearance, i.e. the single-process order)."""
    names = list(dict.fromkeys(name for part in parts for name in part))
    return {name: sum(part[name] for part in parts if name in part) for name in names}


def _reduce(accs: Sequence[_Acc], templated: int) -> int:
    """torchrun: every rank's accumulators merged into ``accs``, in place (sums added up in rank
    order, per-probe rows concatenated in rank = probe order); returns the templated count."""
    if distributed.world_size() == 1:
        return templated
    pieces = distributed.gather(([acc.state() for acc in accs], templated))
    for k, acc in enumerate(accs):
        states = [p[0][k] for p in pieces]
        acc.change._sums = _summed([st[0] for st in states])
        acc.regions._sums = _summed([st[1] for st in states])
        acc.counts = _summed([st[2] for st in states])
        acc.embeddings = RowBuffer.joined(st[3] for st in states)
        acc.attack = {key: RowBuffer.joined(st[4][key] for st in states) for key in acc.attack}
    return int(sum(p[1] for p in pieces))


def probe_stability(
    model: nn.Module,
    data: EvaluationData,
    settings: Sequence[Setting],
    *,
    command: str,
    loss: str | None = None,
    layers: Sequence[str] | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    flip: bool = True,
    max_probes: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    checkpoint: str = "",
    settings_extra: dict | None = None,
) -> AnalysisResult:
    """The clean probes and each setting (attacks and/or degradations), one table row each.

    Tables: ``stability`` (one row per setting, clean first: Rank-1/5/10/20, verification
    accuracy, routing change over all layers, expert usage % and its largest deviation from
    clean, for attacks the achieved norms and the loss before/after), ``routing_change`` (per
    layer), ``region_change`` (per facial region, per layer and ``all``), ``expert_usage`` (per
    layer and ``all``), ``metrics`` (tidy). ``loss`` (attacks): default ``mate-away`` when the
    data has identities, else ``clean-away``.
    """
    started = time.perf_counter()
    chosen = select_layers(model, layers)
    num_experts = expert_count(chosen)
    grids = list(dict.fromkeys(tuple(layer.token_grid) for layer in chosen.values()))
    size = int(model.img_size)
    attacks = [s for s in settings if isinstance(s, AttackSetting)]
    probes = _probe_side(data, max_probes)
    if not probes.sources:
        raise DataError("no probe images to perturb")
    notes: list[str] = []
    if len(probes.sources) < probes.total:
        notes.append(f"subsampled {len(probes.sources)} of {probes.total} probes (round-robin over identities) to keep the run short")

    embedder = EmbeddingModel(model, flip=flip)
    cache = EmbeddingCache(model, batch_size=batch_size, flip=flip)
    gallery_emb = cache(data.split.gallery) if data.split is not None else None
    attack_loss = None
    all_references = None
    if attacks:
        loss = loss or ("mate-away" if data.split is not None else "clean-away")
        attack_loss = get_loss(loss)
        if attack_loss.name != "clean-away" and data.split is None:
            raise DataError(f"{attack_loss.name} needs gallery identities (an identification split); use --loss clean-away for verification pairs alone")
        notes += sorted({n for a in attacks if (n := attack_loss.start_note(a.attack))})
        if attack_loss.name != "clean-away":
            all_references = reference_embeddings(attack_loss, probes.labels, torch.empty(0), torch.from_numpy(gallery_emb),
                                                  data.split.gallery.labels, seed=seed)

    runs: list[Setting | None] = [None, *settings]
    accs = [_Acc() for _ in runs]
    templated = 0
    n = len(probes.sources)
    batches = distributed.shard(range(0, n, batch_size))  # torchrun: this rank's batches (global starts)
    bar = tqdm(total=len(batches) * len(runs), desc=command, unit="batch x setting", disable=not (progress and distributed.is_main()))

    def inputs():
        """Each batch decoded, its landmarks looked up and its region fractions pooled: made in
        the prefetch thread while the model runs the batch before."""
        for start in batches:
            index = list(range(start, min(start + batch_size, n)))
            images = [_decode(probes.sources[i]) for i in index]
            landmarks, missed = _landmarks(images, workers)
            fractions = _fractions(images, landmarks, grids, size)
            yield start, index, images, landmarks, missed, fractions, torch.stack([to_unit_tensor(im, size) for im in images])

    with contextlib.closing(prefetched(inputs(), PREFETCH_BATCHES)) as prepared:
        for start, index, images, landmarks, missed, fractions, x01 in prepared:
            templated += missed
            clean_emb, clean_routing = _forward(model, x01, flip, layers)
            for setting, acc in zip(runs, accs):
                if setting is None:
                    routing, emb = clean_routing, clean_emb
                else:
                    if isinstance(setting, AttackSetting):
                        if all_references is not None:
                            reference = all_references[index]
                        else:
                            reference = reference_embeddings(attack_loss, None, torch.from_numpy(clean_emb), None, None)
                        outcome = run_attack(setting, embedder, attack_loss, x01, reference, seed=seed + start)
                        perturbed = outcome.adversarial
                        for key in ATTACK_VALUES:
                            acc.attack[key].append(getattr(outcome, key).cpu().numpy())
                    else:
                        degraded = setting.apply(images, landmarks, [seed * 1_000_003 + i for i in index])
                        perturbed = torch.stack([to_unit_tensor(im, size) for im in degraded])
                    emb, routing = _forward(model, perturbed, flip, layers)
                acc.update(clean_routing, routing, fractions, emb)
                bar.update(1)
    bar.close()
    templated = _reduce(accs, templated)

    # verification: every probe-side image of a pair replaced by its perturbed version
    pair_rows = pair_keep = clean_pairs = None
    if data.pairs is not None:
        pairs = data.pairs
        where = {_key(s): j for j, s in enumerate(probes.sources)}
        if data.split is not None:
            probe_side = {_key(s) for s in data.split.probe.sources}
        else:
            probe_side = {_key(pairs.sources[i]) for i in set(int(i) for i in pairs.pairs[:, 1])}
        image_of = np.array([where.get(_key(s), -2 if _key(s) in probe_side else -1) for s in pairs.sources])
        pair_keep = (image_of[pairs.pairs] != -2).all(axis=1)  # pairs with a probe left out by subsampling go
        pair_rows = np.flatnonzero(image_of >= 0), image_of[image_of >= 0]
        others = np.flatnonzero(image_of == -1)  # pair images off the probe side: clean (the gallery's are cached)
        clean_pairs = np.zeros((len(pairs.sources), accs[0].embeddings.array.shape[1]), dtype=np.float32)
        if len(others):
            rest = copy.copy(pairs)
            rest.sources, rest.labels = [pairs.sources[i] for i in others], pairs.labels[others]
            clean_pairs[others] = cache(rest)
        if not pair_keep.all():
            notes.append(f"verification on the {int(pair_keep.sum())} of {len(pair_keep)} pairs whose probe-side images were all analysed")

    rows, metrics, per_layer, regions, usage = [], [], [], [], []
    clean_total = None
    for setting, acc in zip(runs, accs):
        desc = _describe(setting)
        probe_emb = acc.embeddings.array
        figures: dict[str, dict[str, float]] = {}
        if data.split is not None:
            figures["identification"] = identification_metrics(probe_emb, probes.labels, gallery_emb, data.split.gallery.labels)
        if data.pairs is not None:
            emb = clean_pairs.copy()
            emb[pair_rows[0]] = probe_emb[pair_rows[1]]
            keep = pair_keep
            figures["verification"] = verification_metrics(emb, data.pairs.pairs[keep], data.pairs.issame[keep], data.pairs.folds[keep])
        change = acc.change.to_frame()
        total_tokens = change["tokens"].sum()
        share = usage_table(acc.counts)
        total = share[share["layer"] == "all"]["percent"].to_numpy()
        if clean_total is None:
            clean_total = total
        row = {
            **desc,
            **{k: v for k, v in figures.get("identification", {}).items() if k.startswith("Rank-")},
            **({"Verification accuracy": figures["verification"]["accuracy"]} if "verification" in figures else {}),
            "routing change": float((change["set_distance"] * change["tokens"]).sum() / total_tokens),
            "top-1 changed": float((change["top1_changed"] * change["tokens"]).sum() / total_tokens),
            **{f"Expert {e} (%)": float(p) for e, p in enumerate(total)},
            "max usage deviation (pts)": float(np.max(np.abs(total - clean_total))),
        }
        if attacks:
            if isinstance(setting, AttackSetting):
                a = {k: v.array for k, v in acc.attack.items()}
                row.update({"loss before": float(a["loss_before"].mean()), "loss after": float(a["loss_after"].mean()),
                            "Linf mean (x255)": float(a["linf"].mean() * 255), "Linf max (x255)": float(a["linf"].max() * 255),
                            "L2 mean": float(a["l2"].mean()),
                            "loss increased (%)": float(100 * np.mean(a["loss_after"] >= a["loss_before"]))})
            else:
                row.update({"loss before": float("nan"), "loss after": float("nan"), "Linf mean (x255)": 0.0,
                            "Linf max (x255)": 0.0, "L2 mean": 0.0, "loss increased (%)": float("nan")})
        rows.append(row)
        metrics += [{"setting": desc["setting"], "protocol": p, "metric": m, "value": v} for p, ms in figures.items() for m, v in ms.items()]
        per_layer.append(change.assign(setting=desc["setting"]))
        regions.append(acc.regions.to_frame().assign(setting=desc["setting"]))
        usage.append(share.assign(setting=desc["setting"]))
    table = pd.DataFrame(rows)
    order = ["setting", "layer"]
    routing_change = pd.concat(per_layer, ignore_index=True)[[*order, "tokens", "set_distance", "top1_changed"]]
    region_change = pd.concat(regions, ignore_index=True)[[*order, "region", "weight", "set_distance", "top1_changed"]]
    expert_usage = pd.concat(usage, ignore_index=True)[[*order, "expert", "assignments", "percent"]]
    if templated:
        notes.append(f"no face found in {templated} probe(s): their regions come from the aligned-face template")
    most = (region_change[(region_change["layer"] == "all") & (region_change["setting"] != CLEAN)]
            .sort_values("set_distance", ascending=False).groupby("setting", sort=False).head(1))
    summary = {
        "probes": n,
        "probes_total": probes.total,
        "gallery": 0 if data.split is None else len(data.split.gallery),
        "pairs": 0 if data.pairs is None else int(pair_keep.sum()),
        "experts": num_experts,
        "moe_layers": len(chosen),
        "settings": len(settings),
        "seconds": round(time.perf_counter() - started, 1),
        "most_changed_region": dict(zip(most["setting"], most["region"])),
        **{k: v for k, v in rows[0].items() if k.startswith(("Rank-", "Verification"))},
    }
    from ..plotting import stability_sweep

    result = AnalysisResult(
        command=command,
        checkpoints=[checkpoint or str(getattr(model, "checkpoint_path", ""))],
        settings={
            "data": data.source,
            "layers": "all" if layers is None else list(layers),
            "settings": [_describe(s)["setting"] for s in settings],
            "loss": attack_loss.name if attack_loss else None,
            "batch_size": batch_size,
            "flip": flip,
            "seed": seed,
            "max_probes": max_probes,
            "perturbed": "probes only (the split's probes; without a split each pair's second image); gallery clean; "
                         "verification pairs use the perturbed version of every probe-side image",
            "routing_change": "per token 1 - |A n B| / |A u B| of the top-k expert index sets, clean vs perturbed (grid tokens "
                              "of the images themselves, not their mirrors); top-1 changed: share of tokens whose rank-1 expert differs",
            "usage": "share (%) of token-expert assignments per expert over the chosen MoE layers, perturbed probes (not mirrors)",
            "notes": notes,
            **(settings_extra or {}),
        },
        tables={"stability": table, "routing_change": routing_change, "region_change": region_change,
                "expert_usage": expert_usage, "metrics": pd.DataFrame(metrics)},
        summary=summary,
        warnings=[w for w in (s.skip_summary for s in data.datasets) if w],
    )
    result.figures[f"{command}_sweep"] = lambda: stability_sweep(table, title=f"moescope {command}: {result.checkpoints[0]}")
    return result


def attack_stability(model: nn.Module, data: EvaluationData, attacks: Sequence[AttackSetting], **kwargs) -> AnalysisResult:
    """:func:`probe_stability` for attacks (``moescope attack``)."""
    if not attacks:
        raise MoescopeError("give at least one attack")
    return probe_stability(model, data, attacks, command="attack", **kwargs)


def degradation_stability(model: nn.Module, data: EvaluationData, degradations: Sequence[ProbeDegradation], **kwargs) -> AnalysisResult:
    """:func:`probe_stability` for degradations (``moescope degrade``)."""
    if not degradations:
        raise MoescopeError("give at least one degradation")
    kwargs.pop("loss", None)
    return probe_stability(model, data, degradations, command="degrade", **kwargs)
