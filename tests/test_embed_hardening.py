"""Hardening of embed.py: one-line errors for bad options, models and inputs; protected output
folders; no NaN embeddings (files and the HEAR API); special files and non-UTF-8 names."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner, Result

import audio
import checkpoints
import embed
import files
import mae

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(depth=1, decoder_depth=1, decoder_dim=64)


@pytest.fixture(scope="module")
def model() -> embed.Embedder:
    torch.manual_seed(0)
    return embed.Embedder(mae.build("mwmae-tiny", **SMALL), batch_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    checkpoints.save_pretrained(model.mae, path)
    return path


def write_clips(folder: Path, count: int, seconds: float = 0.5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    paths = [folder / f"clip{i}.wav" for i in range(count)]
    for path in paths:
        sf.write(path, 0.1 * rng.standard_normal(int(16000 * seconds)).astype(np.float32), 16000)
    return paths


def run_cli(*args) -> Result:
    return CliRunner().invoke(embed.main, [str(a) for a in args] + ["--device", "cpu"])


def assert_one_line_error(result, *fragments) -> str:
    """Non-zero exit, no traceback, and exactly one 'Error:' line holding every fragment."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "weights_only" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------- options and models

@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_size_below_one_is_a_usage_error(tmp_path, checkpoint, value):
    write_clips(tmp_path / "audio", 1)
    result = run_cli(checkpoint, tmp_path / "audio", "--out", tmp_path / "out", "--batch-size", value)
    assert result.exit_code == 2
    assert_one_line_error(result, "--batch-size", value)


def test_misspelt_preset_suggests_the_name(tmp_path):
    write_clips(tmp_path / "audio", 1)
    result = run_cli("mwmae-tiyn", tmp_path / "audio", "--out", tmp_path / "out")
    assert_one_line_error(result, "'mwmae-tiyn' is neither a model file nor a preset",
                          "did you mean mwmae-tiny?", "presets: mae-tiny")
    with pytest.raises(ValueError, match="did you mean mwmae-tiny"):
        embed.load_model("mwmae-tiyn")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        embed.load_model(str(tmp_path / "missing.safetensors"))


def test_preset_as_model_says_random_weights(tmp_path):
    write_clips(tmp_path / "audio", 1, seconds=0.2)
    result = run_cli("mwmae-tiny", tmp_path / "audio", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    notice = "mwmae-tiny is a preset: random initialisation (seed 0), not pretrained weights"
    assert notice in result.stderr and notice not in result.stdout


def hostile_models(folder: Path, checkpoint: Path) -> dict[str, Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    made = {"empty": folder / "empty.pt", "empty safetensors": folder / "empty.safetensors",
            "random bytes": folder / "random.pt", "truncated": folder / "truncated.safetensors",
            "audio": folder / "sound.wav"}
    made["empty"].write_bytes(b"")
    made["empty safetensors"].write_bytes(b"")
    made["random bytes"].write_bytes(rng.bytes(4096))
    made["truncated"].write_bytes(checkpoint.read_bytes()[:50_000])
    sf.write(made["audio"], np.zeros(1600, np.float32), 16000)
    return made


def test_hostile_model_files_give_one_line_naming_the_file(tmp_path, checkpoint):
    write_clips(tmp_path / "audio", 1)
    for kind, path in hostile_models(tmp_path / "models", checkpoint).items():
        result = run_cli(path, tmp_path / "audio", "--out", tmp_path / f"out_{path.stem}")
        assert_one_line_error(result, str(path))
        assert not (tmp_path / f"out_{path.stem}").exists(), kind  # nothing made for a bad MODEL
    # On the command line a folder is always audio (MODEL is optional); the API names it.
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="a_folder: not a model file"):
        embed.load_model(str(tmp_path / "a_folder"))


# ----------------------------------------------------------------------------- folders without audio

def test_empty_folder_is_an_error(tmp_path, checkpoint):
    (tmp_path / "audio").mkdir()
    result = run_cli(checkpoint, tmp_path / "audio", "--out", tmp_path / "out")
    assert_one_line_error(result, f"no audio files found under {tmp_path / 'audio'}")
    assert not (tmp_path / "out" / "embeddings.npy").exists()


def test_folder_without_readable_audio_is_an_error(tmp_path, checkpoint):
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "notes.txt").write_text("not audio")
    (audio / "broken.wav").write_bytes(b"RIFF not really a wave file")
    out = tmp_path / "out"
    result = run_cli(checkpoint, audio, "--out", out)
    assert_one_line_error(result, f"no readable audio under {audio}: 2 files skipped, see {out / 'bad_files.tsv'}")
    assert len((out / "bad_files.tsv").read_text().splitlines()) == 2
    assert not (out / "embeddings.npy").exists()


# ----------------------------------------------------------------------------- protected --out

def test_reused_out_is_refused_and_overwrite_leaves_no_stale_outputs(tmp_path, checkpoint):
    out = tmp_path / "out"
    five, two = tmp_path / "five", tmp_path / "two"
    write_clips(five, 5, seconds=0.3)
    write_clips(two, 2, seconds=0.3)
    assert run_cli(checkpoint, five, "--out", out, "--timestamps").exit_code == 0
    assert len(list((out / "timestamps").glob("*.npz"))) == 5
    refused = run_cli(checkpoint, two, "--out", out, "--timestamps")
    assert_one_line_error(refused, "is not empty", "--overwrite")
    assert len(np.load(out / "embeddings.npy")) == 5  # untouched
    result = run_cli(checkpoint, two, "--out", out, "--timestamps", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "timestamps").glob("*.npz")) == ["000000.npz", "000001.npz"]
    assert len(np.load(out / "embeddings.npy")) == 2
    assert len((out / "files.txt").read_text().splitlines()) == 2


def test_second_process_on_the_same_out_fails_at_once(tmp_path, checkpoint):
    write_clips(tmp_path / "audio", 1)
    out = tmp_path / "out"
    with files.OutputFolder(out):  # another process embedding into `out` right now
        result = run_cli(checkpoint, tmp_path / "audio", "--out", out)
    assert_one_line_error(result, "in use by another process")
    assert not (out / "embeddings.npy").exists()


# ----------------------------------------------------------------------------- silent NaN

def test_file_that_overflows_the_frontend_is_a_bad_file(tmp_path, checkpoint):
    """Finite samples of 1e30 (a float WAV): the power spectrum overflows float32, so the
    log-mel holds Inf/NaN; the file is reported, never embedded as a NaN row."""
    audio = tmp_path / "audio"
    write_clips(audio, 1)
    sf.write(audio / "loud.wav", np.full(8000, 1e30, np.float32), 16000, subtype="FLOAT")
    out = tmp_path / "out"
    result = run_cli(checkpoint, audio, "--out", out)
    assert result.exit_code == 0, result.output
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (1, 960) and np.isfinite(embeddings).all()
    assert [Path(p).name for p in (out / "files.txt").read_text().splitlines()] == ["clip0.wav"]
    bad = dict(line.split("\t") for line in (out / "bad_files.tsv").read_text().splitlines())
    assert list(bad) == [str(audio / "loud.wav")] and bad[str(audio / "loud.wav")].startswith("log-mel not finite")


@pytest.mark.parametrize("function", [embed.get_scene_embeddings, embed.get_timestamp_embeddings])
def test_hear_api_rejects_non_finite_audio(model, function):
    audio = 0.1 * torch.randn(4, 8000, generator=torch.Generator().manual_seed(0))
    audio[1, 100], audio[3, 5] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"rows 1, 3 \(2 of 4\) hold NaN or Inf"):
        function(audio, model)
    loud = torch.full((2, 8000), 1e30)
    loud[0] = 0.1
    with pytest.raises(ValueError, match="clip 1: log-mel not finite"):
        function(loud, model)


def test_every_clip_is_checked_after_the_frontend(model):
    """Embedder.chunks, the step every file and HEAR clip passes, refuses a non-finite log-mel."""
    with pytest.raises(audio.AudioError, match="x.wav: log-mel not finite"):
        model.chunks(torch.full((4000,), 1e30), what="x.wav")
    chunks, kept = model.chunks(torch.zeros(4000), what="silence.wav")  # finite: -log(eps)
    assert torch.isfinite(chunks).all() and kept == [embed.num_frames(4000)]


# ----------------------------------------------------------------------------- input shapes

def test_channels_last_audio_is_rejected(model):
    """(n_samples, 2) stereo would be n_samples sounds of 2 samples each (23 min for 2 s)."""
    with pytest.raises(ValueError, match=r"mono audio; got \(2000, 2\): pass audio.T / mix down channels"):
        embed.get_scene_embeddings(torch.zeros(2000, 2), model)
    with pytest.raises(ValueError, match=r"at least 400 samples"):
        embed.get_timestamp_embeddings(torch.zeros(3, 100), model)
    assert embed.get_scene_embeddings(torch.zeros(1, 400), model).shape == (1, 960)


# ----------------------------------------------------------------------------- special files

def test_special_files_are_reported_under_the_user_name(tmp_path, checkpoint):
    """A link loop, a dangling link, a FIFO and a link to /dev/zero: reported, never opened
    (the FIFO would hang the run, /dev/zero never ends). A subprocess, so that a hang on
    broken code fails the test instead of stalling it."""
    audio = tmp_path / "audio"
    write_clips(audio, 1)
    os.symlink("loop.wav", audio / "loop.wav")
    os.symlink("missing.wav", audio / "dangling.wav")
    os.mkfifo(audio / "pipe.wav")
    os.symlink("/dev/zero", audio / "zero.wav")
    out = tmp_path / "out"
    try:
        done = subprocess.run([sys.executable, "embed.py", str(checkpoint), str(audio), "--out", str(out),
                               "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("embed.py hung on special files")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert [Path(p).name for p in (out / "files.txt").read_text().splitlines()] == ["clip0.wav"]
    bad = dict(line.split("\t") for line in (out / "bad_files.tsv").read_text().splitlines())
    assert sorted(bad) == sorted(str(audio / name) for name in ("dangling.wav", "loop.wav", "pipe.wav", "zero.wav"))
    assert all(reason for reason in bad.values())


def test_non_utf8_names_are_written_losslessly(tmp_path, checkpoint):
    audio = tmp_path / "audio"
    write_clips(audio, 1)
    folder = os.fsencode(audio)
    os.rename(os.path.join(folder, b"clip0.wav"), os.path.join(folder, b"caf\xe9.wav"))
    with open(os.path.join(folder, b"bad\xff.wav"), "wb") as f:
        f.write(b"not audio")
    out = tmp_path / "out"
    result = run_cli(checkpoint, audio, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "files.txt").read_bytes() == os.path.join(folder, b"caf\xe9.wav") + b"\n"
    assert (out / "bad_files.tsv").read_bytes().startswith(os.path.join(folder, b"bad\xff.wav") + b"\t")
