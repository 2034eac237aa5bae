"""convert.py end to end: official files -> our model, equal to the official outputs."""
import gzip
import shutil

import pytest
import torch
from click.testing import CliRunner

import checkpoints
import convert
import mae
from test_convert_readers import fake_ml_collections, official_layout_checkpoint  # noqa: F401 (fixture)
from test_mae import FIXTURES, MWMAE_CHECKPOINT, SMALL, compare, init_params, load, official_audiomaepp_layout, run


@pytest.fixture
def mwmae_checkpoint(tmp_path):
    """The official save function's file, unpacked from the fixture's gzip."""
    path = tmp_path / "checkpoint_0"
    with gzip.open(MWMAE_CHECKPOINT) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


def test_mwmae_release_converts_to_the_official_numbers(mwmae_checkpoint, tmp_path):
    out = tmp_path / "mwmae.safetensors"
    result = CliRunner().invoke(convert.main, [str(mwmae_checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = checkpoints.load_pretrained(out).eval()
    expected = mae.preset_config("mwmae-tiny", **SMALL, trainable_pos=True)
    assert model.cfg == expected
    io = load("mwmae_jax/mwmae/io.npz")
    compare(run(model, io["x"][..., 0], io["noise"]), load("mwmae_jax/mwmae/io_perturbed.npz"), 1e-5)


def test_audiomaepp_release_converts_to_the_official_numbers(tmp_path, fake_ml_collections):  # noqa: F811
    state = torch.load(FIXTURES / "audiomaepp/state_dict.pt", weights_only=True)
    override = {k: torch.from_numpy(v) for k, v in load("audiomaepp/params_perturbed_override.npz").items()}
    path = tmp_path / "checkpoint-99.pth"
    torch.save(official_layout_checkpoint({**state, **override}, fake_ml_collections), path)
    out = tmp_path / "audiomaepp.safetensors"
    result = CliRunner().invoke(convert.main, [str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = checkpoints.load_pretrained(out).eval()
    assert model.cfg == mae.preset_config("audiomaepp-tiny", **SMALL, reuse_norm2=True)
    io = load("audiomaepp/io.npz")
    ours = run(model, io["x"][:, 0], io["noise"])
    ours["features"] = official_audiomaepp_layout(ours["features"])
    compare(ours, load("audiomaepp/io_perturbed.npz"), 2e-5)


def test_mae_release_config_is_inferred():
    state = convert.flax_to_state_dict(init_params("mae"))
    assert convert.infer_config(state) == mae.preset_config("mae-tiny", **SMALL)


def test_our_checkpoints_pass_through(tmp_path):
    model = mae.build("mwmae-tiny", depth=1, decoder_depth=1, decoder_dim=64).eval()
    checkpoints.save_pretrained(model, tmp_path / "a.safetensors")
    result = CliRunner().invoke(convert.main, [str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 0, result.output
    again = checkpoints.load_pretrained(tmp_path / "b.safetensors").eval()
    x = torch.randn(1, 200, 80)
    assert again.cfg == model.cfg and torch.equal(again.forward_features(x), model.forward_features(x))


def test_overrides_and_clear_errors(mwmae_checkpoint, tmp_path):
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(convert.main, [str(mwmae_checkpoint), "--out", str(out), "--set", "trainable_pos=false"])
    assert result.exit_code == 0 and not checkpoints.load_pretrained(out).cfg.trainable_pos
    result = CliRunner().invoke(convert.main, [str(mwmae_checkpoint), "--out", str(out), "--set", "bogus=1"])
    assert result.exit_code != 0 and "unknown config field" in result.output
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    result = CliRunner().invoke(convert.main, [str(junk), "--out", str(out)])
    assert result.exit_code == 1 and "junk.bin" in result.output and "Traceback" not in result.output
