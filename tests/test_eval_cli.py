"""``moescope eval`` and the bundled demo: recorded figures reproduce, low-resolution probes, bad inputs."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np

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


# --- eval --data DIR: identity folders -> seeded split and pairs, alignment on the way ---------


@pytest.fixture(scope="module")
def identity_folder(tmp_path_factory):
    """12 demo identities, one single-image identity, and two real photos (astronaut, grace_hopper)
    as single-image identities (gallery distractors once aligned), plus a non-face texture."""
    import cv2
    import matplotlib.cbook
    import matplotlib.image
    import skimage.data

    root = tmp_path_factory.mktemp("ids")
    folders = sorted(p for p in demo_images_dir().iterdir() if p.is_dir())
    for folder in folders[:12]:
        shutil.copytree(folder, root / folder.name)
    (root / "single").mkdir()
    shutil.copy(sorted(folders[-1].iterdir())[0], root / "single" / "only.png")
    for name, image in (("astronaut", skimage.data.astronaut()),
                        ("grace_hopper", matplotlib.image.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg")))):
        (root / name).mkdir()
        cv2.imwrite(str(root / name / f"{name}.png"), cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2BGR))
    (root / "texture").mkdir()
    texture = (skimage.data.lfw_subset()[110] * 255).astype(np.uint8)
    cv2.imwrite(str(root / "texture" / "texture.png"), texture)
    return root


def test_eval_data_builds_a_seeded_recorded_protocol(identity_folder):
    first = eval_json("demo:after", "--data", str(identity_folder), "--seed", "3")
    again = eval_json("demo:after", "--data", str(identity_folder), "--seed", "3")
    other = eval_json("demo:after", "--data", str(identity_folder), "--seed", "4")
    assert first == again and first["tables"]["split"] != other["tables"]["split"]
    protocol = first["settings"]["protocol"]
    split = first["tables"]["split"]
    roles = {}
    for row in split:
        roles.setdefault(row["identity"], []).append(row["role"])
    assert protocol["seed"] == 3 and protocol["identities_with_probes"] == 12
    assert all(r.count("gallery") == 1 for name, r in roles.items() if len(r) > 1)
    assert roles["single"] == ["distractor"] and roles["astronaut"] == ["distractor"] and roles["grace_hopper"] == ["distractor"]
    assert "texture" not in roles  # no accepted face: left out and counted
    alignment = first["summary"]["alignment"]
    assert alignment["mode"] == "auto" and alignment["aligned"] >= 2 and alignment["rejected"] >= 1
    assert any("left out of the evaluation" in w for w in first["warnings"])
    ident = first["summary"]["identification"]
    assert ident["distractors"] == 3 and ident["gallery"] == 15 and ident["probes"] == len(split) - 15
    assert first["summary"]["chance_rank1"] == pytest.approx(1 / 15) and ident["Rank-1"] > 5 / 15
    pairs = first["tables"]["pairs"]
    identity_of = {row["image"]: row["identity"] for row in split}
    assert sum(p["same"] for p in pairs) == sum(not p["same"] for p in pairs) == protocol["genuine_pairs"]
    assert all((identity_of[p["first"]] == identity_of[p["second"]]) == p["same"] for p in pairs)
    assert first["summary"]["verification"]["pairs"] == len(pairs) and first["summary"]["chance_verification"] == 0.5


def test_eval_data_alignment_modes(identity_folder):
    none = eval_json("demo:after", "--data", str(identity_folder), "--align", "none")
    assert none["summary"]["alignment"] == {"mode": "none", "unaligned": len(none["tables"]["split"]), "rejected": 0, "unreadable": 0}
    assert "texture" in {row["identity"] for row in none["tables"]["split"]}  # nothing detected, nothing rejected
    # demo faces are canonical crops: auto passes them through unchanged, so their embeddings are those of --align none
    auto = eval_json("demo:after", "--data", str(identity_folder))
    assert auto["summary"]["alignment"]["canonical"] == sum(1 for r in auto["tables"]["split"] if r["identity"] not in ("astronaut", "grace_hopper"))


def test_eval_data_errors(tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(sorted(next(demo_images_dir().iterdir()).iterdir())[0], tmp_path / "a" / "x.png")
    assert main(["eval", "--data", str(tmp_path)]) == 2  # one identity with one image: no split


def test_split_sources_are_used_as_given_unless_aligned():
    """Default --align for --split is none (the protocol as given); auto passes the demo split's canonical
    crops through and aligns the rest, keeping every pair whose faces are accepted."""
    given = eval_json("demo:after")
    assert "alignment" not in given["summary"]
    auto = eval_json("demo:after", "--align", "auto")
    alignment = auto["summary"]["alignment"]
    assert alignment["mode"] == "auto" and alignment["canonical"] >= 290
    assert sum(v for k, v in alignment.items() if k in ("aligned", "canonical")) + alignment["rejected"] == given["summary"]["images"]
    assert auto["summary"]["verification"]["pairs"] <= given["summary"]["verification"]["pairs"]
    assert auto["summary"]["identification"]["Rank-1"] == pytest.approx(given["summary"]["identification"]["Rank-1"], abs=0.02)
