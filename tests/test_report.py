"""The one-page report: self-contained HTML (parsed, and opened in headless Chromium) and its JSON twin."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from skimage import data as skdata

from facemoe_model.errors import DataError
from moescope.cost import flops_table
from moescope.demo import load_model, resolve_checkpoint
from moescope.report import (
    NotApplicable, Section, build_report, failed_section, report_dict, run_section, section_from_result, write_report,
)
from moescope.results import AnalysisResult
from moescope.trace import RoutingTrace

HOSTILE = '<script>alert("x")</script> & "quotes"'


def _photos() -> dict[str, np.ndarray]:
    hopper = cv2.cvtColor(cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))), cv2.COLOR_BGR2RGB)
    return {"astronaut": skdata.astronaut(), "grace_hopper": hopper}


@pytest.fixture(scope="module")
def results() -> list[AnalysisResult]:
    """Two real results: expert usage of demo:after on two photos, and its FLOPs (top-k vs dense)."""
    model = load_model("demo:after").eval()
    photos = _photos()
    batch = torch.stack([
        torch.from_numpy(cv2.resize(img, (120, 120), interpolation=cv2.INTER_AREA)).permute(2, 0, 1).float() / 127.5 - 1
        for img in photos.values()
    ])
    with RoutingTrace(model) as trace, torch.inference_mode():
        model(batch)
        routing = trace.pop()
    rows = []
    for layer, r in [*routing.items(), ("all", None)]:
        topk = np.concatenate([v.topk.ravel() for v in routing.values()]) if r is None else r.topk.ravel()
        counts = np.bincount(topk, minlength=3)
        rows += [{"layer": layer, "expert": e, "assignments": int(n), "percent": 100 * n / counts.sum()} for e, n in enumerate(counts)]
    table = pd.DataFrame(rows)
    fig = Figure(figsize=(6, 2.6))
    axes = fig.subplots(1, 3)
    for ax, (name, img) in zip(axes, photos.items()):
        ax.imshow(img)
        ax.set_title(name)
        ax.axis("off")
    overall = table[table.layer == "all"]
    axes[2].bar(overall.expert, overall.percent, color="#1f3b57")
    axes[2].set_xlabel("expert")
    axes[2].set_ylabel("% of assignments")
    fig.tight_layout()
    usage_result = AnalysisResult(
        command="regions", checkpoints=["demo:after"], settings={"images": list(photos), "count": "topk"},
        tables={"expert_usage": table}, summary={"images": len(photos)}, warnings=[HOSTILE], figures={"usage": fig},
    )
    flops, _ = flops_table(model, batch[:1])
    bar = Figure(figsize=(4, 2.6))
    ax = bar.subplots()
    ax.bar(flops.routing, flops.gflops_per_image, color=["#1f3b57", "#c62828"])
    ax.set_ylabel("GFLOPs per image")
    bar.tight_layout()
    cost_result = AnalysisResult(command="bench", checkpoints=["demo:after", "facemoe_swin_official"],
                                 tables={"flops": flops}, summary={"dense_over_topk": flops.relative_to_topk.iloc[1]},
                                 figures={"flops": bar})
    return [usage_result, cost_result]


def _missing_identities() -> AnalysisResult:
    raise DataError("no identity folders in /data/faces: ablate needs one folder per identity")


def _no_pairs() -> AnalysisResult:
    raise NotApplicable("attack needs verification pairs (--split)")


@pytest.fixture(scope="module")
def sections(results) -> list[Section]:
    usage, cost = results
    return [
        section_from_result(usage, "B.1", "Expert usage by facial region", commands=["moescope regions demo:after --out out/regions"]),
        section_from_result(cost, "B.11", "Inference cost", commands=["moescope bench demo:after"]),
        run_section("B.5", "Expert ablation", _missing_identities, commands=["moescope ablate demo:after --data /data/faces"]),
        run_section("B.6", "Routing attack", _no_pairs),
        failed_section("E", "Limitations", "written by hand", status="not applicable"),
    ]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.section_ids: list[str] = []
        self.img_src: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.section_ids.append(attrs["id"])
        if tag == "img":
            self.img_src.append(attrs["src"])
        for key in ("href", "src", "action", "poster"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Collector:
    parser = _Collector()
    parser.feed(page)
    parser.close()
    return parser


def test_report_is_one_self_contained_page(sections, tmp_path):
    html_path, json_path = write_report(sections, tmp_path, meta={"command": "moescope report demo:before demo:after"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]  # no temp files left
    page = html_path.read_text(encoding="utf-8")
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "<script" not in lowered
    parsed = _parse(page)
    ids = [s.id for s in sections]
    assert parsed.section_ids == ids == ["b1-expert-usage-by-facial-region", "b11-inference-cost", "b5-expert-ablation",
                                         "b6-routing-attack", "e-limitations"]
    assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}
    assert all(link.startswith("#") for link in parsed.links)  # only the table of contents
    assert len(parsed.img_src) == 2
    for src in parsed.img_src:
        assert src.startswith("data:image/png;base64,")
        png = np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8)
        assert b"http" not in png.tobytes()  # no URL even in the PNG metadata
        img = cv2.imdecode(png, cv2.IMREAD_COLOR)
        assert img is not None and img.shape[0] > 100 and img.std() > 10
    text = " ".join(parsed.text)
    assert HOSTILE in text  # the hostile warning is shown as text, not markup
    assert "DataError: no identity folders in /data/faces" in text and "Analysis failed" in text
    assert "attack needs verification pairs (--split)" in text and "Does not apply" in text
    assert "moescope regions demo:after --out out/regions" in text
    digest = hashlib.sha256(resolve_checkpoint("demo:after").read_bytes()).hexdigest()
    assert f"sha256:{digest}" in text
    assert "no file (model name or random weights)" in text  # facemoe_swin_official has no file
    assert len(re.findall(r"<table id=\"T_[^\"]+\" class=\"data\">", page)) == 2  # the two Styler tables
    assert build_report(sections, meta={"command": "moescope report demo:before demo:after"}) == page  # deterministic


def test_json_twin_has_the_same_content(sections, results, tmp_path):
    _, json_path = write_report(sections, tmp_path)
    twin = json.loads(json_path.read_text())
    assert twin == report_dict(sections)
    assert [s["id"] for s in twin["sections"]] == [s.id for s in sections]
    assert [s["status"] for s in twin["sections"]] == ["ok", "ok", "failed", "not applicable", "not applicable"]
    usage = twin["sections"][0]
    assert usage["tables"]["expert_usage"] == results[0].tables["expert_usage"].to_dict(orient="records")
    assert usage["figures"] == ["usage"] and usage["warnings"] == [HOSTILE]
    assert usage["commands"] == ["moescope regions demo:after --out out/regions"]
    assert twin["sections"][2]["note"].startswith("DataError: ")


def test_section_ids_are_unique():
    page = build_report([failed_section("B.4", "Drift", "a"), failed_section("B.4", "Drift", "b")])
    assert _parse(page).section_ids == ["b4-drift", "b4-drift-2"]


def test_long_tables_are_cut_on_the_page_but_whole_in_json():
    df = pd.DataFrame({"token": np.arange(450), "value": np.linspace(0, 1, 450)})
    section = Section("B.2", "Maps", tables={"tokens": df})
    page = build_report([section], max_rows=100)
    assert page.count("<tr>") - 1 <= 101 and "showing the first 100 of 450 rows" in page
    assert len(report_dict([section])["sections"][0]["tables"]["tokens"]) == 450


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def test_report_opens_in_headless_chromium(sections, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    html_path, _ = write_report(sections, tmp_path / "out")
    url = html_path.resolve().as_uri()
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    parsed = _parse(dom)
    assert parsed.section_ids == [s.id for s in sections]
    assert len(parsed.img_src) == 2 and all(s.startswith("data:image/png;base64,") for s in parsed.img_src)
    shot = tmp_path / "out.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000", url], capture_output=True, timeout=180, check=True)
    image = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert image is not None and image.shape == (2000, 1200)
    assert image.std() > 20  # not blank: header band, text, tables and figures
    assert (image < 100).mean() > 0.02  # a real amount of dark ink (header, text, figures)
