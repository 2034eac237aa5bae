"""Tests for embed.py: the HEAR API (the public validator's checks), the frame and chunk
arithmetic, long inputs, the official layout and the command line."""
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import audio
import checkpoints
import embed
import mae

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMALL = dict(depth=1, decoder_depth=1, decoder_dim=64)


@pytest.fixture(scope="module")
def model() -> embed.Embedder:
    torch.manual_seed(0)
    return embed.Embedder(mae.build("mwmae-tiny", **SMALL), batch_size=4)


def noise(n: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """The validator's input: uniform white noise in [-1, 1], int(seconds * 16000) samples."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, int(seconds * 16000), generator=generator) * 2 - 1


# ----------------------------------------------------------------------------- HEAR validator

def test_model_attributes():
    model = embed.load_model("mwmae-tiny")
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 16000
    assert type(model.scene_embedding_size) is int and model.scene_embedding_size == 960
    assert type(model.timestamp_embedding_size) is int and model.timestamp_embedding_size == 960


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0])
def test_validator_timestamp_checks(model, seconds):
    """hear-validator's _check_timestamp_embeddings (GitHub version) on 2 clips."""
    embeddings, timestamps = embed.get_timestamp_embeddings(noise(2, seconds), model)
    assert embeddings.dtype == torch.float32 and timestamps.dtype == torch.float32
    assert embeddings.ndim == 3 and timestamps.ndim == 2
    assert embeddings.shape[0] == 2 and embeddings.shape[:2] == timestamps.shape
    assert embeddings.shape[2] == model.timestamp_embedding_size
    diff = np.diff(timestamps.numpy())
    average = diff.mean()
    assert np.abs(diff - average).max() <= 1.0  # evenly spaced within 1 ms
    assert average <= 50.0
    first, last = timestamps.min().item(), timestamps.max().item()
    assert first <= average
    assert 1000 * seconds - average <= last <= 1000 * seconds  # inside, and covering the end


def test_validator_pypi_checks(model):
    """hearvalidator 2021.0.2 (PyPI): 16 clips of 2 s, then scene embeddings of 8 x 3.74 s."""
    embeddings, timestamps = embed.get_timestamp_embeddings(noise(16, 2.0), model)
    assert embeddings.shape == (16, 50, 960) and timestamps.shape == (16, 50)
    assert torch.all(torch.abs(torch.diff(timestamps) - torch.diff(timestamps).mean()) < 1e-3)
    scene = embed.get_scene_embeddings(noise(8, 3.74), model)
    assert scene.dtype == torch.float32 and scene.shape == (8, model.scene_embedding_size)


def test_scene_embeddings_batch(model):
    """hear-validator (GitHub): 4 clips of 2.74 s; and scene = mean of the timestamp frames."""
    audio = noise(4, 2.74)
    scene = embed.get_scene_embeddings(audio, model)
    assert scene.dtype == torch.float32 and scene.shape == (4, model.scene_embedding_size)
    frames, _ = embed.get_timestamp_embeddings(audio, model)
    torch.testing.assert_close(scene, frames.mean(1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scene[0], scene[1])  # different clips, different embeddings


def test_bad_input_shapes(model):
    with pytest.raises(ValueError):
        embed.get_scene_embeddings(torch.zeros(16000), model)
    with pytest.raises(ValueError):
        embed.get_timestamp_embeddings(torch.zeros(2, 0), model)


# ----------------------------------------------------------------------------- frames and chunks

def test_num_frames_is_every_centre_inside_the_audio():
    for samples in list(range(1, 3000, 7)) + [17120, 31680, 32000, 64000, 32000 * 30 + 123]:
        centres = 40 * np.arange(samples // 100 + 2) + 15  # ms
        expected = max(1, int(np.sum(centres <= samples / 16)))
        assert embed.num_frames(samples) == expected, samples
    assert embed.num_frames(32000) == 50  # exactly 2 s: one chunk


def test_timestamps_at_frame_centres():
    stamps = embed.frame_timestamps(100)
    np.testing.assert_array_equal(stamps.numpy(), 40.0 * np.arange(100) + 15.0)
    np.testing.assert_array_equal(embed.frame_timestamps(3, patch_frames=8).numpy(), [35.0, 115.0, 195.0])


def test_two_seconds_is_one_chunk_without_padding(model):
    wave = noise(1, 2.0)[0]
    chunks, kept = model.chunks(wave)
    assert chunks.shape == (1, 200, 80) and kept == [50]
    expected = audio.normalize(audio.LogMel()(wave))[:200]  # 201 mel frames, the last one unused
    torch.testing.assert_close(chunks[0], expected)


@pytest.mark.parametrize("seconds,n_chunks,last", [(2.04, 2, 1), (0.81, 1, 20), (4.0, 2, 50), (4.01, 2, 50)])
def test_chunk_counts(model, seconds, n_chunks, last):
    chunks, kept = model.chunks(noise(1, seconds)[0])
    assert chunks.shape[0] == n_chunks and kept[-1] == last and sum(kept) == embed.num_frames(int(seconds * 16000))


def test_recipe_against_direct_computation(model):
    """1.07 s: whole-clip normalised log-mel, reflect-padded (numpy) to 200 frames, encoded,
    the first 27 frames kept."""
    wave = noise(1, 1.07, seed=3)[0]
    x = audio.normalize(audio.LogMel()(wave)).numpy()  # (108, 80)
    padded = torch.from_numpy(np.pad(x, ((0, 200 - len(x)), (0, 0)), mode="reflect"))
    with torch.no_grad():
        expected = model.mae.forward_features(padded[None])[0, :27]
    frames, _ = embed.get_timestamp_embeddings(wave[None], model)
    torch.testing.assert_close(frames[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,target", [(5, 17), (2, 9), (1, 4), (7, 7), (108, 200)])
def test_reflect_indices_match_numpy(length, target):
    expected = np.pad(np.arange(length), (0, target - length), mode="reflect" if length > 1 else "edge")
    np.testing.assert_array_equal(embed.reflect_indices(length, target).numpy(), expected)


def test_batching_does_not_change_embeddings(model):
    """Clips of several lengths, embedded with 1, 3 and 64 chunks per forward pass."""
    clips = [noise(1, s, seed=i)[0] for i, s in enumerate([0.3, 2.5, 1.0, 4.7, 0.05])]
    results = []
    for batch_size in (1, 3, 64):
        model.batch_size = batch_size
        results.append([frames for _, frames in embed.timestamp_embeddings(clips, model)])
    model.batch_size = 4
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [len(f) for f in results[0]] == [embed.num_frames(len(c)) for c in clips]


# ----------------------------------------------------------------------------- long audio

def test_segmented_log_mel_equals_whole(model):
    wave = noise(1, 7.0, seed=5)[0]
    whole = model.log_mel(wave, segment_frames=10**9)
    for segment in (37, 200, 699):
        torch.testing.assert_close(model.log_mel(wave, segment_frames=segment), whole, atol=1e-6, rtol=0)


def test_ten_minutes_in_bounded_pieces(model, monkeypatch):
    """10 min of audio: the STFT only ever sees one segment, the encoder only `batch_size`
    chunks at a time, and the scene embedding equals the mean of the timestamp frames."""
    samples = 10 * 60 * 16000
    wave = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(0))
    stft_inputs, encoder_batches = [], []
    frontend_forward, encoder_forward = model.frontend.forward, model.mae.forward_features
    monkeypatch.setattr(model.frontend, "forward", lambda w: stft_inputs.append(w.shape[-1]) or frontend_forward(w))
    monkeypatch.setattr(model.mae, "forward_features", lambda x: encoder_batches.append(len(x)) or encoder_forward(x))
    model.batch_size = 16
    scene = embed.get_scene_embeddings(wave[None], model)
    T = embed.num_frames(samples)
    assert T == 15000 and sum(encoder_batches) == math.ceil(T / 50)
    assert max(encoder_batches) <= 16
    assert max(stft_inputs) <= (embed.SEGMENT_FRAMES + 3) * audio.HOP
    frames, stamps = embed.get_timestamp_embeddings(wave[None], model)
    model.batch_size = 4
    assert frames.shape == (1, T, 960) and stamps[0, -1] <= samples / 16
    torch.testing.assert_close(scene[0], frames[0].mean(0), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- official layout

def test_official_layout_reproduces_the_release():
    """The AudioMAE++ fixture (official weights, official forward_features): our encoder with
    the converted weights and layout="official" gives the release's scrambled features; the
    default layout differs from them."""
    import convert

    state = torch.load(FIXTURES / "audiomaepp" / "state_dict.pt", weights_only=True)
    io = np.load(FIXTURES / "audiomaepp" / "io.npz")
    model = mae.build("audiomaepp-tiny", depth=2, decoder_dim=128, decoder_depth=2, reuse_norm2=True)
    model.load_state_dict(convert.audiomaepp_to_state_dict(state))
    x = torch.from_numpy(io["x"][:, 0])  # (2, 200, 80)
    official = embed.Embedder(model, layout="official").features(x).numpy()
    np.testing.assert_allclose(official, io["features"], atol=2e-5, rtol=2e-5)
    time_major = embed.Embedder(model).features(x).numpy()
    assert np.abs(time_major - io["features"]).max() > 0.1
    # Row 0 of the release holds the tokens (t, f) = (0, 0), (10, 0), (20, 0), (30, 0), (40, 0).
    tokens = time_major.reshape(2, 250, 192)
    np.testing.assert_array_equal(official[0, 0].reshape(5, 192), tokens[0, [0, 50, 100, 150, 200]])


def test_official_layout_option(model):
    official = embed.Embedder(model.mae, layout="official")
    x = torch.randn(2, 200, 80)
    torch.testing.assert_close(official.features(x), embed.official_layout(model.features(x), 5))
    with pytest.raises(ValueError):
        embed.Embedder(model.mae, layout="frequency")


# ----------------------------------------------------------------------------- loading

def test_preset_is_seeded_and_checkpoints_load(tmp_path):
    a, b, c = (embed.load_model("mwmae-tiny", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.mae.patch_embed.weight, b.mae.patch_embed.weight)
    assert not torch.equal(a.mae.patch_embed.weight, c.mae.patch_embed.weight)
    checkpoints.save_pretrained(c.mae, tmp_path / "model.safetensors")
    loaded = embed.load_model(str(tmp_path / "model.safetensors"))
    assert torch.equal(loaded.mae.patch_embed.weight, c.mae.patch_embed.weight)
    with pytest.raises(FileNotFoundError):
        embed.load_model(str(tmp_path / "missing.safetensors"))


# ----------------------------------------------------------------------------- command line

def test_cli_end_to_end(tmp_path, model):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(folder / "a.wav", 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    sf.write(folder / "sub" / "b.flac", 0.1 * rng.standard_normal(44100 * 3).astype(np.float32), 44100)
    sf.write(folder / "c.wav", 0.1 * rng.standard_normal(400).astype(np.float32), 16000)
    (folder / "broken.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), 16000)
    (folder / "notes.txt").write_text("not audio")
    checkpoint = tmp_path / "model.safetensors"
    checkpoints.save_pretrained(model.mae, checkpoint)
    out = tmp_path / "out"
    result = CliRunner().invoke(embed.main, [str(checkpoint), str(folder), "--out", str(out),
                                             "--timestamps", "--device", "cpu", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    files = (out / "files.txt").read_text().splitlines()
    assert [Path(f).name for f in files] == ["a.wav", "c.wav", "b.flac"]  # sorted paths
    bad = dict(line.split("\t") for line in (out / "bad_files.tsv").read_text().splitlines())
    assert sorted(Path(p).name for p in bad) == ["broken.wav", "empty.wav", "notes.txt"]
    assert all(reason for reason in bad.values())
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.dtype == np.float32 and embeddings.shape == (3, 960)
    for row, file in enumerate(files):
        wave = torch.from_numpy(audio.load_audio(file))
        expected = embed.get_scene_embeddings(wave[None], model)[0].numpy()
        np.testing.assert_allclose(embeddings[row], expected, atol=1e-5, rtol=1e-5)
        stored = np.load(out / "timestamps" / f"{row:06d}.npz")
        assert stored["embeddings"].shape == (embed.num_frames(len(wave)), 960)
        np.testing.assert_array_equal(stored["timestamps"], embed.frame_timestamps(len(stored["embeddings"])).numpy())
    assert "3 files embedded" in result.output and "3 bad files" in result.output
