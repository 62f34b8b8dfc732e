"""`moescope report` end to end: every section on the page (in headless Chromium too), the JSON twin,
commands that reproduce their sections, failures as notes, collecting earlier folders."""
from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import pytest

from moescope.cli import main
from moescope.runners.report import ANALYSES, ReportInputs, plan_commands


def _run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(map(str, args)))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    status, stdout, stderr = _run("report", "demo:before", "demo:after", "--out", out)
    assert status == 0, stderr
    assert "wrote" in stdout and "sections" in stdout
    return out


def _installed(command: str) -> bool:
    return importlib.util.find_spec(f"moescope.commands.{command}") is not None


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.refs: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.sections.append(attrs["id"])
        for key in ("href", "src", "action", "poster", "srcset", "data"):
            if key in attrs:
                self.refs.append((tag, key, attrs[key] or ""))


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def test_every_section_is_on_the_page_and_in_the_json(report_dir):
    twin = json.loads((report_dir / "report.json").read_text())
    ids = [a.key.replace("_", "-") for a in ANALYSES]
    assert [s["id"] for s in twin["sections"]] == ids
    assert [s["number"] for s in twin["sections"]] == ["B.1", "B.3", "B.7", "B.11", "B.12", "B.16", "D", "E"]
    page = _parse((report_dir / "report.html").read_text())
    assert page.sections == ids
    by_key = {a.key: s for a, s in zip(ANALYSES, twin["sections"])}
    for key in ("regions", "ablate", "bench", "cka"):  # the analyses that exist today run on the demo
        assert by_key[key]["status"] == "ok", by_key[key]["note"]
        assert by_key[key]["tables"] and by_key[key]["checkpoints"]
    for analysis in ANALYSES:
        section = by_key[analysis.key]
        assert section["commands"] and section["commands"][0].startswith(f"moescope {analysis.command} ")
        if not _installed(analysis.command):  # a command not installed yet is a visible note, not a crash
            assert section["status"] == "not applicable" and "not available" in section["note"]
    hashes = list(by_key["cka"]["checkpoints"].values())
    assert len(hashes) == 2 and all(h.startswith("sha256:") for h in hashes)
    assert by_key["regions"]["figures"] and by_key["bench"]["tables"]["capture_overhead"]
    assert any("lighter than the command's defaults" in w for w in by_key["bench"]["warnings"])


def test_section_commands_reproduce_their_tables(report_dir, tmp_path):
    twin = {s["id"]: s for s in json.loads((report_dir / "report.json").read_text())["sections"]}
    for key in ("cka", "regions"):
        argv = shlex.split(twin[key]["commands"][0])[1:]
        out = str(report_dir / key)
        argv[argv.index("--out") + 1] = str(tmp_path / key)
        status, _, err = _run(*argv, "--json")
        assert status == 0, err
        again = json.loads((tmp_path / key / "result.json").read_text())
        assert again["tables"] == json.loads((Path(out) / "result.json").read_text())["tables"]


def test_page_has_no_network_reference(report_dir):
    text = (report_dir / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert images and all(b"http" not in base64.b64decode(i) for i in images)  # not even in PNG metadata
    prose = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text).lower()
    assert not re.search(r"(https?:|ftp:|wss?:)?//[a-z0-9]", prose), "a URL on the page"
    assert "url(" not in prose and "@import" not in prose
    page = _parse(text)
    assert not page.tags & {"script", "link", "iframe", "object", "embed", "base"}
    for tag, key, value in page.refs:
        assert (tag == "a" and value.startswith("#")) or (tag == "img" and value.startswith("data:image/png;base64,")), (tag, key, value[:40])
    assert "default-src 'none'" in text  # the CSP forbids any fetch


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def test_report_in_headless_chromium(report_dir, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    url = (report_dir / "report.html").resolve().as_uri()
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    page = _parse(dom)
    assert page.sections == [a.key.replace("_", "-") for a in ANALYSES]
    assert "script" not in page.tags
    shot = tmp_path / "page.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,1800", url], capture_output=True, timeout=180, check=True)
    image = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert image is not None and image.shape == (1800, 1200)
    assert image.std() > 20 and (image < 100).mean() > 0.02  # header band, text and tables: not blank


def test_a_failing_analysis_is_a_note(tmp_path):
    status, stdout, stderr = _run("report", "demo:before", "demo:after", "--split", tmp_path / "missing",
                                  "--only", "ablate,cka", "--out", tmp_path / "out")
    assert status == 0, stderr
    sections = {s["id"]: s for s in json.loads((tmp_path / "out" / "report.json").read_text())["sections"]}
    assert list(sections) == ["ablate", "cka"]
    assert sections["ablate"]["status"] == "failed" and "missing" in sections["ablate"]["note"]
    assert "\n" not in sections["ablate"]["note"] and "Traceback" not in sections["ablate"]["note"]
    assert sections["cka"]["status"] == "ok"
    assert "Analysis failed" in (tmp_path / "out" / "report.html").read_text()


def test_one_checkpoint_drift_does_not_apply(tmp_path):
    status, _, err = _run("report", "demo:after", "--only", "cka", "--out", tmp_path)
    assert status == 0, err
    (section,) = json.loads((tmp_path / "report.json").read_text())["sections"]
    assert section["status"] == "not applicable" and "two checkpoints" in section["note"]


def test_collecting_earlier_folders(report_dir, tmp_path):
    status, stdout, err = _run("report", "--from", report_dir, "--out", tmp_path)
    assert status == 0, err
    ran = {s["id"]: s for s in json.loads((report_dir / "report.json").read_text())["sections"]}
    collected = {s["id"]: s for s in json.loads((tmp_path / "report.json").read_text())["sections"]}
    assert list(collected) == list(ran)
    for key, section in ran.items():
        if section["status"] == "ok":
            mine = collected[key]
            assert mine["status"] == "ok" and mine["tables"] == section["tables"] and mine["commands"] == section["commands"]
            assert mine["figures"] == section["figures"]
        else:
            assert collected[key]["status"] == "not applicable" and "not collected" in collected[key]["note"]
    # one analysis folder on its own
    status, _, err = _run("report", "--from", report_dir / "cka", "--only", "cka", "--out", tmp_path / "one")
    assert status == 0, err
    assert json.loads((tmp_path / "one" / "report.json").read_text())["sections"][0]["status"] == "ok"


@pytest.mark.parametrize("args, message", [
    (["--only", "nope"], "--only: unknown section nope"),
    (["--from", "/no/such/folder"], "no such folder"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    status, _, err = _run("report", *args, "--out", tmp_path)
    assert status == 2 and err.startswith("moescope: error: ") and message in err


def test_light_options_the_command_lacks_are_left_out():
    bench = next(a for a in ANALYSES if a.key == "bench")
    inputs = ReportInputs("demo:before", "demo:after")
    argv, notes = plan_commands(bench, inputs, Path("o"), known={"--repeats", "--out"})
    assert argv == ["bench", "demo:after", "--repeats", "3", "--out", "o"]
    assert len(notes) == 1 and "--batch-sizes" in notes[0]
    full, _ = plan_commands(bench, ReportInputs("demo:before", "demo:after", full=True))
    assert full == ["bench", "demo:after"]
