"""``moescope eval`` and the bundled demo: recorded figures reproduce, low-resolution probes, bad inputs."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from facemoe_model import read_checkpoint
from facemoe_model.protocols import load_protocols, write_split
from moescope.cli import main
from moescope.demo import demo_images_dir, demo_split_dir, resolve_checkpoint


def eval_json(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", *argv, "--json"]) == 0
    return json.loads(out.getvalue())


def demo_metadata(name: str) -> dict:
    return read_checkpoint(resolve_checkpoint(f"demo:{name}"))["metadata"]


def assert_figures_match(measured: dict, recorded: dict) -> None:
    """Equal counts; rates equal up to one probe / one pair (float summation order may differ across CPUs)."""
    for protocol, metrics in recorded.items():
        unit = 1 / metrics["probes" if protocol == "identification" else "pairs"]
        for name, value in metrics.items():
            if value != value:  # NaN: too few impostors, null in JSON
                assert measured[protocol][name] is None, name
            else:
                assert measured[protocol][name] == pytest.approx(value, abs=unit), (protocol, name)


@pytest.mark.parametrize(("name", "lowres"), [("after", None), ("before", 16)])
def test_eval_reproduces_the_figures_recorded_in_the_demo_checkpoints(name, lowres):
    meta = demo_metadata(name)
    recorded = meta["validation"]["hr" if lowres is None else f"lr{lowres}"]
    argv = [f"demo:{name}"] + ([] if lowres is None else ["--lowres", str(lowres)])
    result = eval_json(*argv) if name != "after" else eval_json()  # no argument at all: demo:after on the demo split
    assert result["settings"]["data"] == str(demo_split_dir())
    assert_figures_match(result["summary"], recorded)
    assert set(result["tables"]) == {"identification", "verification"}


def test_demo_tells_the_low_resolution_story():
    """before: good, not saturated on HR, clearly worse on 16x16 probes; after: recovers much of that gap, keeps HR."""
    before, after = (demo_metadata(name)["validation"] for name in ("before", "after"))
    rank1 = {(model, setting): figures[setting]["identification"]["Rank-1"]
             for model, figures in (("before", before), ("after", after)) for setting in ("hr", "lr16")}
    gap = rank1["before", "hr"] - rank1["before", "lr16"]
    assert 0.5 < rank1["before", "hr"] < 0.95 and gap > 0.1
    assert rank1["after", "lr16"] - rank1["before", "lr16"] > gap / 3
    assert rank1["after", "hr"] > rank1["before", "hr"] - 0.05
    for figures in (before, after):
        for setting in ("hr", "lr16"):
            assert figures[setting]["identification"]["Rank-1"] > 10 * 0.01  # 100 gallery identities
            assert figures[setting]["verification"]["accuracy"] > 0.75  # balanced pairs: chance 0.5
    assert after["lr16"]["verification"]["TAR@FAR=1e-01"] > before["lr16"]["verification"]["TAR@FAR=1e-01"]
    assert demo_metadata("after")["init"].endswith("before.pt")
    for name in ("before", "after"):
        meta = demo_metadata(name)
        assert meta["command"].startswith("moescope train ") and meta["training_seconds"] > 0
        assert meta["data"]["kind"] == "synthetic"


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    """An evaluation folder built with write_split from 10 identities of the demo image set."""
    root = tmp_path_factory.mktemp("eval")
    for folder in sorted(p for p in demo_images_dir().iterdir() if p.is_dir())[:10]:
        shutil.copytree(folder, root / "ids" / folder.name)
    return write_split(root / "ids", root / "split", seed=1)


def test_write_split_builds_a_balanced_protocol(small_split):
    data = load_protocols(split=small_split)
    assert len(data.split.gallery) == 10 and len(data.split.probe) == len(data.pairs) - len(data.split.gallery)
    genuine = data.pairs.issame
    assert genuine.sum() == (~genuine).sum() > 0
    names = [p.parent.name for p in data.pairs.sources]
    same_identity = [names[a] == names[b] for a, b in data.pairs.pairs]
    assert same_identity == genuine.tolist()


def test_probe_degradation_reaches_probes_only(small_split):
    clean = eval_json("demo:before", "--split", str(small_split))
    identity = eval_json("demo:before", "--split", str(small_split), "--lowres", "120")  # down to 120 px: unchanged
    tiny = eval_json("demo:before", "--split", str(small_split), "--lowres", "6")
    assert identity["summary"] == clean["summary"]
    assert tiny["summary"]["identification"]["Rank-1"] < clean["summary"]["identification"]["Rank-1"]
    assert tiny["summary"]["verification"]["accuracy"] < clean["summary"]["verification"]["accuracy"]
    assert tiny["settings"]["lowres"] == 6 and "DownUp(size=6" in tiny["settings"]["probe_transform"]


@pytest.mark.parametrize(
    "argv",
    [
        ["missing.pt"],
        ["--split", "{empty}"],
        ["--pairs", "{empty}/pairs.txt"],
        ["--bin", "{empty}/lfw.bin"],
        ["--lowres", "0"],
    ],
)
def test_bad_inputs_fail_with_one_line(argv, tmp_path, capsys):
    argv = [a.format(empty=tmp_path) for a in argv]
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moescope: error: ") and "\n" not in err


# --- the command line: command list, models --json, shared defaults ---------------------------


def test_models_json_lists_the_registry(capsys):
    from facemoe_model import list_models

    assert main(["models", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["command"] == "models"
    assert {r["name"]: r["description"] for r in result["tables"]["models"]} == list_models()
    assert "facemoe_swin_tiny" in captured.err  # the human list goes to stderr with --json
    assert main(["models"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("facemoe_swin_official ")


def test_a_command_that_fails_to_import_is_an_error(monkeypatch):
    import importlib

    import moescope.cli as cli

    real = importlib.import_module

    def broken(name, *args):
        if name == "moescope.commands.info":
            raise ImportError("No module named 'something_missing'")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(RuntimeError, match="'info' cannot be imported: No module named 'something_missing'"):
        cli.build_parser()


def test_train_defaults_are_train_config_defaults():
    import dataclasses

    from facemoe_model.train import TrainConfig
    from moescope.cli import build_parser

    args = build_parser().parse_args(["train", "--out", "run"])
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        option = {"head_scale": "scale", "head_margin": "margin"}.get(field.name, field.name)
        if field.name in ("model", "model_args", "lowres", "hflip"):
            continue  # no default on the command line: --model (None: TrainConfig's), --model-arg, --lowres, --no-hflip
        assert getattr(args, option) == getattr(defaults, field.name), field.name
    assert args.model is None and args.lowres is None and args.no_hflip is (not defaults.hflip)


def test_default_checkpoint_literal_appears_once():
    """``demo:after`` is written once in the CLI's code (commands, runners, options): the DEFAULT_CHECKPOINT constant."""
    import re
    from pathlib import Path

    import moescope
    from moescope.demo import DEFAULT_CHECKPOINT

    root = Path(moescope.__file__).parent
    files = [root / "demo.py", root / "options.py", root / "cli.py", *(root / "commands").glob("*.py"), *(root / "runners").glob("*.py")]
    hits = [(p.relative_to(root).as_posix(), n) for p in files
            for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"""["']demo:after["']""", line)]
    assert DEFAULT_CHECKPOINT == "demo:after" and hits == [("demo.py", hits[0][1])], hits
