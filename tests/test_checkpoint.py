"""Checkpoint round trips and every way a checkpoint can be wrong."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from facemoe_model import create_model, load_checkpoint, read_checkpoint, save_checkpoint
from facemoe_model.checkpoint import CHECKPOINT_FORMAT, LEGACY_FORMATS
from facemoe_model.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_model("facemoe_swin_tiny").eval()


def test_own_format_round_trip(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "m.pt", {"note": "test", "epochs": 1})
    assert read_checkpoint(path)["format"] == CHECKPOINT_FORMAT == "facemoe"
    loaded = load_checkpoint(path)
    assert loaded.checkpoint_format == "facemoe" and loaded.checkpoint_metadata["epochs"] == 1
    x = torch.randn(2, 3, 120, 120)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny_model(x))
    half = load_checkpoint(save_checkpoint(tiny_model, tmp_path / "h.pt", half=True))
    with torch.no_grad():
        assert (half(x) - tiny_model(x)).abs().max() < 0.05 * tiny_model(x).abs().max()
    assert os.path.getsize(tmp_path / "h.pt") < 0.6 * os.path.getsize(tmp_path / "m.pt")


@pytest.mark.parametrize("name", ["before.pt", "after.pt"])
def test_bundled_demo_checkpoints_in_the_legacy_format_still_load(name, tmp_path):
    from importlib import resources

    with resources.as_file(resources.files("facemoe_model") / "assets" / "demo" / name) as path:
        raw = read_checkpoint(path)
        assert raw["format"] in LEGACY_FORMATS  # written as "moescope.facemoe"; not re-saved
        model = load_checkpoint(path)
    assert model.checkpoint_format == "facemoe" and model.model_config["name"] == raw["config"]["name"]
    own = {k: v for k, v in raw["state_dict"].items()}
    assert all(torch.equal(model.state_dict()[k].to(v.dtype), v) for k, v in own.items())
    # the same layout under the new name loads to the same weights
    resaved = load_checkpoint(save_checkpoint(model, tmp_path / name))
    assert all(torch.equal(resaved.state_dict()[k], v) for k, v in model.state_dict().items())


def test_vit_round_trip(tmp_path):
    torch.manual_seed(1)
    model = create_model("facemoe_vit_tiny", depth=2).eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "v.pt"))
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def _one_line(exc: CheckpointError) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


def _held_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, non-persistent ones (Swin's position index and window masks) too."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("name", ["facemoe_swin_tiny", "facemoe_vit_tiny"])
@pytest.mark.parametrize("half", [False, True])
def test_loading_draws_no_random_weights_and_rebuilds_every_tensor(name, half, tmp_path):
    """The model a checkpoint is loaded into is not randomly initialised first (built on the meta
    device: no random draws), yet ends up with every tensor a model built as usual holds after
    loading the same file: the checkpoint's weights (float32 from a float16 file), and the
    derived buffers recomputed, each parameter in a storage of its own, trainable."""
    torch.manual_seed(1)
    path = save_checkpoint(create_model(name).eval(), tmp_path / "m.pt", half=half)
    reference = create_model(name)  # built as usual (random weights), then overwritten
    reference.load_state_dict(read_checkpoint(path)["state_dict"])
    reference.eval()
    rng = torch.random.get_rng_state()
    loaded = load_checkpoint(path)
    assert torch.equal(torch.random.get_rng_state(), rng)
    ours, theirs = _held_tensors(loaded), _held_tensors(reference)
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert tensor.device.type == "cpu" and tensor.dtype == theirs[key].dtype and torch.equal(tensor, theirs[key]), key
    params = list(loaded.parameters())
    assert all(p.requires_grad and p.is_contiguous() for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
    x = torch.randn(2, 3, loaded.model_config["img_size"], loaded.model_config["img_size"])
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


class _DerivedWithoutRecompute(torch.nn.Module):
    """A module deriving tensors in its constructor that no ``init_non_persistent_buffers``
    recomputes: a non-persistent buffer (``plain=False``) or a plain tensor attribute."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        table = torch.arange(16.0).reshape(4, 4) ** 0.5
        if plain:
            self.table = table
        else:
            self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) @ self.table


@pytest.mark.parametrize("plain", [False, True])
def test_a_module_that_cannot_recompute_what_it_derives_is_built_as_usual(plain, tmp_path, monkeypatch):
    from facemoe_model.models import registry

    name = "_test_derived_without_recompute"  # registered for this test only
    monkeypatch.setitem(registry._REGISTRY, name, (_DerivedWithoutRecompute, {"plain": plain}, ""))
    model = create_model(name)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "d.pt"))
    assert not loaded.table.is_meta and torch.equal(loaded.table, model.table)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_missing_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_truncated_and_garbage(official_model_pt, tmp_path):
    data = official_model_pt.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(tmp_path / "t.pt")
    _one_line(e.value)
    (tmp_path / "g.pt").write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "g.pt")
    _one_line(e.value)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickled objects or code") as e:
        load_checkpoint(tmp_path / "evil.pt")
    _one_line(e.value)


def test_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not a FaceMoE checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="not a FaceMoE checkpoint"):
        load_checkpoint(tmp_path / "dict.pt")


def test_missing_unexpected_and_shape_mismatch(official_vector, tmp_path):
    sd = dict(official_vector["state_dict"])
    missing = {k: v for k, v in sd.items() if k != "norm.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing key.*norm.weight"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected key.*extra.weight"):
        load_checkpoint(tmp_path / "extra.pt")
    bad = dict(sd)
    bad["norm.weight"] = torch.zeros(7)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="shape mismatch at norm.weight"):
        load_checkpoint(tmp_path / "shape.pt")


def test_mismatched_expert_counts(official_vector, tmp_path):
    sd = {k: v for k, v in official_vector["state_dict"].items() if ".layers.1.blocks.1.mlp.experts.2." not in "." + k}
    torch.save(sd, tmp_path / "experts.pt")
    with pytest.raises(CheckpointError, match="mismatched expert counts: layers.1.blocks.1.mlp has 2 experts"):
        load_checkpoint(tmp_path / "experts.pt")


def test_top_k_out_of_range(official_model_pt):
    with pytest.raises(CheckpointError, match="top_k=5 out of range"):
        load_checkpoint(official_model_pt, top_k=5)


def test_cli_reports_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    proc = subprocess.run([sys.executable, "-m", "moescope", "info", str(tmp_path / "bad.pt")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("moescope: error:")


def test_cli_info_on_official_checkpoint(official_model_pt):
    proc = subprocess.run([sys.executable, "-m", "moescope", "info", str(official_model_pt), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(proc.stdout)
    assert result["command"] == "info" and result["summary"]["moe_layers"] == 6
    assert [r["layer"] for r in result["tables"]["moe_layers"]][0] == "layers.0.blocks.0.mlp"
