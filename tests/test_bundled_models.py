"""Bundled models (models/<name>.safetensors, float16): loading by name and by path, float16
files against the float32 model they came from, the default model of embed.py, and
convert.py --dtype float16.

Most tests use a small model written into a temporary models folder (checkpoints.MODELS_DIR
points there); test_every_real_bundled_model checks whatever files the repository ships."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import checkpoints
import convert
import embed
import mae

REAL_MODELS_DIR = checkpoints.MODELS_DIR
SMALL = dict(depth=1, decoder_depth=1, decoder_dim=64)
NAME = checkpoints.DEFAULT_MODEL


def small_model(seed: int = 0) -> mae.MAE:
    torch.manual_seed(seed)
    return mae.build("mwmae-tiny", **SMALL)


def stored_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def clips(count: int = 3, seconds: float = 1.5) -> torch.Tensor:
    """Noise, a tone and a chirp-like mix: short clips with different spectra."""
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    rows = [0.1 * rng.standard_normal(t.size), 0.3 * np.sin(2 * np.pi * 440 * t),
            0.2 * np.sin(2 * np.pi * (200 + 2000 * t) * t) + 0.02 * rng.standard_normal(t.size)]
    return torch.tensor(np.stack(rows[:count]), dtype=torch.float32)


@pytest.fixture
def bundled(tmp_path, monkeypatch) -> tuple[mae.MAE, Path]:
    """A models folder holding the default model's name as a small float16 file; returns the
    float32 model it was made from and the file."""
    folder = tmp_path / "models"
    folder.mkdir()
    model = small_model()
    path = folder / f"{NAME}.safetensors"
    checkpoints.save_pretrained(model, path, dtype=torch.float16)
    monkeypatch.setattr(checkpoints, "MODELS_DIR", folder)
    return model, path


def assert_float32_copy_of_half(loaded: mae.MAE, original: mae.MAE) -> None:
    """`loaded` is float32 in memory and holds `original`'s weights rounded to float16."""
    assert loaded.cfg == original.cfg
    for name, tensor in original.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.float32, name
        assert torch.equal(got, tensor.half().float()), name


# ----------------------------------------------------------------------------- loading

def test_bundled_model_loads_by_name_and_by_path(bundled):
    original, path = bundled
    assert checkpoints.bundled_models() == {NAME: path}
    assert stored_dtypes(path) == {"F16"}
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["dtype"] == "float16"
        assert json.loads(f.metadata()["config"]) == json.loads(json.dumps(original.cfg.to_dict()))
    for spec in (NAME, path, str(path)):
        assert_float32_copy_of_half(checkpoints.load_pretrained(spec), original)
    by_name, by_path = embed.load_model(NAME), embed.load_model(str(path))
    assert by_name.source == by_path.source and str(path.resolve()) in by_name.source
    assert_float32_copy_of_half(by_name.mae, original)


def test_no_name_loads_the_default_and_a_preset_stays_random(bundled):
    original, path = bundled
    for default in (embed.load_model(), embed.load_model("")):
        assert str(path.resolve()) in default.source
        assert_float32_copy_of_half(default.mae, original)
    preset = embed.load_model("mwmae-tiny")
    assert preset.source == "preset mwmae-tiny, seed 0"


def test_misspelt_bundled_name_suggests_it(bundled):
    with pytest.raises(ValueError, match=f"did you mean {NAME}\\?.*bundled: {NAME}; presets: mae-tiny"):
        embed.load_model("mwmae-tiny-debain")


def test_missing_default_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "MODELS_DIR", tmp_path / "no_models")
    with pytest.raises(FileNotFoundError, match=f"the default model {NAME} is missing: no file "):
        embed.load_model()


def test_every_real_bundled_model():
    """Every file in the repository's models/ (none before the trained models are added):
    loads by name and by path to the same float32 weights, stores float16, has a sane config
    and gives finite embeddings of the right size."""
    real = {name: path for name, path in checkpoints.bundled_models().items()}
    assert all(path.parent == REAL_MODELS_DIR for path in real.values())
    for name, path in real.items():
        assert stored_dtypes(path) == {"F16"}, name
        by_name, by_path = embed.load_model(name), embed.load_model(str(path))
        assert by_name.source == by_path.source
        cfg = by_name.mae.cfg
        assert cfg.input_size[1] == 80 and cfg.depth >= 1 and cfg.embedding_size > 0, name
        for tensor in by_name.mae.state_dict().values():
            assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
        assert all(torch.equal(a, b) for a, b in zip(by_name.mae.state_dict().values(),
                                                     by_path.mae.state_dict().values()))
        scene = embed.get_scene_embeddings(clips(1, 0.5), by_name)
        assert scene.shape == (1, cfg.embedding_size) and torch.isfinite(scene).all(), name


# ----------------------------------------------------------------------------- float16 vs float32

def test_float16_file_embeddings_match_the_float32_model(tmp_path):
    """Embeddings from a float16 file agree with those of the float32 model it was saved from:
    max |difference| <= 5e-3 * max |embedding|, for scene and timestamp embeddings.

    Why this bound: float16 rounds each weight with a relative error of at most 2^-11 (4.9e-4).
    The encoder's LayerNorms keep that from compounding through the blocks: measured on a
    full 12-block mwmae-tiny (random init; the same held for a 400-step pretrained one), the
    max difference was 4e-4 to 6e-4 of the largest embedding value, about one float16
    rounding. 5e-3 leaves ~10x margin for other weights and inputs, while a wrong upcast
    (e.g. bfloat16's 2^-8 rounding, or mixed-up tensors) would break it."""
    torch.manual_seed(0)
    model = mae.build("mwmae-tiny", decoder_depth=1, decoder_dim=64)  # the full 12-block encoder
    path = tmp_path / "half.safetensors"
    checkpoints.save_pretrained(model, path, dtype=torch.float16)
    full, half = embed.Embedder(model), embed.load_model(str(path))
    audio = clips()
    pairs = {"scene": (embed.get_scene_embeddings(audio, full), embed.get_scene_embeddings(audio, half)),
             "timestamp": (embed.get_timestamp_embeddings(audio, full)[0],
                           embed.get_timestamp_embeddings(audio, half)[0])}
    for kind, (reference, from_half) in pairs.items():
        assert from_half.dtype == torch.float32
        error = (reference - from_half).abs().max().item()
        assert 0 < error <= 5e-3 * reference.abs().max().item(), kind  # 0: the file was not float16


def test_save_pretrained_refuses_other_dtypes(tmp_path):
    with pytest.raises(ValueError, match="cannot store weights as torch.int8"):
        checkpoints.save_pretrained(small_model(), tmp_path / "x.safetensors", dtype=torch.int8)
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- command lines

def write_clips(folder: Path, count: int = 2) -> None:
    folder.mkdir()
    for i, row in enumerate(clips(count, 0.5)):
        sf.write(folder / f"clip{i}.wav", row.numpy(), 16000)


def test_embed_without_model_uses_the_default(bundled, tmp_path):
    _, path = bundled
    write_clips(tmp_path / "audio")
    out = tmp_path / "out"
    result = CliRunner().invoke(embed.main, [str(tmp_path / "audio"), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"no MODEL given: using the bundled pretrained {NAME} ({path})" in result.stderr
    assert str(path.resolve()) in json.loads((out / "model.json").read_text())["source"]
    assert np.load(out / "embeddings.npy").shape[0] == 2


def test_embed_without_model_and_without_default_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "MODELS_DIR", tmp_path / "no_models")
    write_clips(tmp_path / "audio")
    result = CliRunner().invoke(embed.main, [str(tmp_path / "audio"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines() == [
        f"Error: the default model {NAME} is missing: no file {tmp_path / 'no_models' / NAME}.safetensors; "
        "give MODEL (a model file, a bundled model: none here, or a preset)"]
    assert not (tmp_path / "out").exists()


def test_model_named_without_a_folder_after_it_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(embed.main, ["mwmae-tiny", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "'mwmae-tiny' is taken as MODEL (it is not a folder): give at least one folder" in result.output


def test_convert_to_float16_halves_the_file_and_round_trips(tmp_path):
    original = small_model()
    full, half, again = (tmp_path / name for name in ("full.safetensors", "half.safetensors", "again.safetensors"))
    checkpoints.save_pretrained(original, full)
    for source, target in ((full, half), (half, again)):
        result = CliRunner().invoke(convert.main, [str(source), "--out", str(target), "--dtype", "float16"])
        assert result.exit_code == 0, result.output
        assert "(float16)" in result.output
    assert stored_dtypes(full) == {"F32"} and stored_dtypes(half) == {"F16"}
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    assert_float32_copy_of_half(checkpoints.load_pretrained(half), original)
    twice, once = load_file(again), load_file(half)  # float16 -> float32 -> float16 is exact
    assert twice.keys() == once.keys() and all(torch.equal(twice[k], once[k]) for k in once)


def test_checkpoints_command_names_the_stored_dtype(bundled):
    result = CliRunner().invoke(checkpoints.main, [NAME])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith(f"{bundled[1]}: safetensors model file, ") and first.endswith("stored as float16")


def test_evaluate_without_model_uses_the_default(bundled, tmp_path):
    import evaluate
    from test_evaluate import write_task

    _, path = bundled
    tones = write_task(tmp_path / "tones", "trainvaltest", per_split=1)
    out = tmp_path / "out"
    fast = ["--device", "cpu", "--jobs", "1", "--seeds", "1", "--max-epochs", "3"]
    result = CliRunner().invoke(evaluate.main, [str(tones), "--out", str(out), *fast])  # no MODEL, no `run`
    assert result.exit_code == 0, result.output
    assert f"no MODEL given: using the bundled pretrained {NAME} ({path})" in result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["model_arg"] == NAME and str(path.resolve()) in results["model"]["source"]
