"""Tests for audio.py (reading audio, the log-mel frontend) and data.py (feature store, crops,
loader, demo set)."""
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

import audio
import data

REPO = Path(__file__).resolve().parents[1]
CLIPS = REPO / "tests" / "fixtures" / "audio"
EPS = np.finfo(np.float32).eps


def real_clips() -> list[Path]:
    """Real 16 kHz clips (fixtures/audio/README.md): a spoken word, a spoken digit upsampled
    from 8 kHz, a drum stroke zero-padded at the end, background noise."""
    names = ["speech_commands_yes.flac", "fsdd_seven.flac", "mridangam_tham.flac", "speech_commands_background.flac"]
    return [CLIPS / name for name in names]


def librosa_log_mel(samples: np.ndarray, htk: bool = True, eps: float = EPS) -> np.ndarray:
    """Float64 reference: librosa with the SPEC's frontend arguments -> (frames, 80)."""
    mel = librosa.feature.melspectrogram(
        y=samples.astype(np.float64), sr=16000, n_fft=400, hop_length=160, win_length=400,
        window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=80,
        fmin=50.0, fmax=8000.0, htk=htk, norm=None, dtype=np.float64,
    )  # (80, frames)
    return np.log(mel + eps).T


def sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------------------
# LogMel
# ---------------------------------------------------------------------------


def test_filterbank_matches_librosa():
    reference = librosa.filters.mel(
        sr=16000, n_fft=400, n_mels=80, fmin=50, fmax=8000, htk=True, norm=None, dtype=np.float64
    ).T
    np.testing.assert_allclose(audio.mel_filterbank(), reference, rtol=0, atol=1e-12)


def test_log_mel_float64_matches_librosa():
    frontend = audio.LogMel(dtype=torch.float64)
    for path in real_clips():
        samples = audio.load_audio(path)
        ours = frontend(torch.from_numpy(samples.astype(np.float64))).numpy()
        reference = librosa_log_mel(samples)
        assert ours.shape == reference.shape == (1 + len(samples) // 160, 80)
        assert np.abs(ours - reference).max() <= 1e-4, path.name  # typically ~1e-13


def test_log_mel_float32_close_to_float64_reference():
    frontend = audio.LogMel()
    for path in real_clips():
        samples = audio.load_audio(path)
        ours = frontend(torch.from_numpy(samples))
        assert ours.dtype == torch.float32
        difference = np.abs(ours.numpy() - librosa_log_mel(samples))
        # float32 FFT rounding: ~1e-6 on average, up to ~1e-3 in near-silent bins (see SPEC).
        assert difference.mean() <= 1e-4, path.name


@pytest.mark.parametrize("variant", [{"htk": False}, {"eps": 1e-10}, {"eps": 1e-6}])
def test_librosa_comparison_detects_wrong_variants(variant):
    """The reference comparison above is sensitive to the mel scale and the log eps."""
    samples = audio.load_audio(real_clips()[0])
    ours = audio.LogMel(dtype=torch.float64)(torch.from_numpy(samples.astype(np.float64))).numpy()
    assert np.abs(ours - librosa_log_mel(samples, **variant)).max() > 1e-4


def test_log_mel_shapes_batches_and_short_inputs():
    frontend = audio.LogMel()
    batch = torch.randn(3, 2, 16000)
    out = frontend(batch)
    assert out.shape == (3, 2, 101, 80)
    torch.testing.assert_close(out[1, 0], frontend(batch[1, 0]))
    for samples in (0, 1, 150, 200, 201, 401):  # below 201 samples reflect padding is impossible
        out = frontend(torch.randn(samples))
        assert out.shape[-1] == 80 and out.shape[0] >= 1 and torch.isfinite(out).all()


def test_log_mel_buffers_follow_module_and_are_not_saved():
    frontend = audio.LogMel()
    assert frontend.state_dict() == {}
    assert frontend.double().window.dtype == torch.float64
    assert frontend(torch.randn(1000, dtype=torch.float64)).dtype == torch.float64


def test_normalize_whole_clip_population_std():
    x = torch.randn(4, 200, 80, dtype=torch.float64) * 3 + 5
    y = audio.normalize(x)
    torch.testing.assert_close(y.mean(dim=(-2, -1)), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(y.std(dim=(-2, -1), correction=0), torch.ones(4, dtype=torch.float64))
    expected = (x[0].numpy() - x[0].numpy().mean()) / (x[0].numpy().std() + 1e-8)  # numpy: ddof 0
    np.testing.assert_allclose(y[0].numpy(), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# load_audio
# ---------------------------------------------------------------------------


def test_load_audio_mixes_stereo_to_mono(tmp_path):
    left, right = sine(440, 0.5, 16000), sine(1000, 0.5, 16000)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    samples = audio.load_audio(path)
    assert samples.dtype == np.float32 and samples.shape == (8000,)
    np.testing.assert_allclose(samples, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("rate", [44100, 8000])
def test_load_audio_resamples_to_16k(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.flac"
    sf.write(path, sine(1000, 1.0, rate), rate)
    samples = audio.load_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 16000) <= 1
    assert abs(peak_frequency(samples, 16000) - 1000) <= 2
    assert 0.45 < np.abs(samples[1000:-1000]).max() < 0.55


def test_load_audio_keeps_silence(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    assert not audio.load_audio(path).any()


def write_bad_file(folder: Path, kind: str) -> Path:
    """One unusable file of each kind the loader must reject."""
    if kind == "missing":
        return folder / "missing.wav"
    if kind == "zero_bytes":
        path = folder / "zero_bytes.wav"
        path.write_bytes(b"")
    elif kind == "no_samples":
        path = folder / "no_samples.wav"
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif kind == "nan":
        path = folder / "nan.wav"
        samples = sine(440, 0.5, 16000)
        samples[100] = np.nan
        sf.write(path, samples, 16000, subtype="FLOAT")
    elif kind == "inf":
        path = folder / "inf.wav"
        samples = sine(440, 0.5, 16000)
        samples[100] = np.inf
        sf.write(path, samples, 16000, subtype="FLOAT")
    elif kind == "text":
        path = folder / "text.wav"
        path.write_text("this is not audio\n" * 100)
    return path


@pytest.mark.parametrize("kind", ["missing", "zero_bytes", "no_samples", "nan", "inf", "text"])
def test_load_audio_rejects_bad_files(tmp_path, kind):
    path = write_bad_file(tmp_path, kind)
    with pytest.raises(audio.AudioError) as caught:
        audio.load_audio(path)
    assert path.name in str(caught.value)
    assert caught.value.reason


# ---------------------------------------------------------------------------
# audio.py alone, and as a command
# ---------------------------------------------------------------------------


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_frontend_module_imports_no_model_and_no_data_code():
    done = run_python("-c", "import sys, audio; print(sorted({'attention', 'mae', 'data', "
                            "'train', 'embed'} & set(sys.modules)))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_audio_command_prints_the_log_mel_of_one_file():
    path = real_clips()[0]  # 1 s at 16 kHz
    done = run_python("audio.py", str(path))
    assert done.returncode == 0, done.stderr
    log_mel = audio.LogMel()(torch.from_numpy(audio.load_audio(path)))  # (101, 80)
    assert done.stdout.startswith(f"{path}: 1.00 s -> log-mel (101, 80)")
    assert f"mean {log_mel.mean():.2f}, std {log_mel.std(correction=0):.2f}" in done.stdout


def test_audio_command_refuses_bad_files_in_one_line(tmp_path):
    path = write_bad_file(tmp_path, "text")
    done = run_python("audio.py", str(path))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"Error: {path}: unreadable (Format not recognised.)\n"


# ---------------------------------------------------------------------------
# Feature store, crops, loader, demo set
# ---------------------------------------------------------------------------

GOOD = {  # file name -> expected frames (1 + samples // 160 at 16 kHz)
    "a.wav": 301,
    "sub/b.wav": 251,
    "sub/deeper/c.flac": 201,
    "stereo_44k.wav": 201,
    "short.wav": 51,
}
BAD = {  # file name -> a word the reason must contain
    "silent.wav": "silent",
    "zero_bytes.wav": "unreadable",
    "no_samples.wav": "empty",
    "nan.wav": "non-finite",
    "text.wav": "unreadable",
    "notes.txt": "unreadable",
    "huge.wav": "not finite",
}


def write_audio_folder(folder: Path) -> Path:
    """Good clips in nested folders (wav, flac, stereo 44.1 kHz, 0.5 s) and bad files."""
    rng = np.random.default_rng(0)
    noise = lambda seconds, rate=16000: (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32)
    (folder / "sub" / "deeper").mkdir(parents=True)
    sf.write(folder / "a.wav", noise(3.0) + sine(440, 3.0, 16000), 16000)
    sf.write(folder / "sub" / "b.wav", noise(2.5), 16000, subtype="FLOAT")
    sf.write(folder / "sub" / "deeper" / "c.flac", noise(2.0), 16000)
    sf.write(folder / "stereo_44k.wav", np.stack([noise(2.0, 44100)] * 2, axis=1), 44100)
    sf.write(folder / "short.wav", noise(0.5), 16000)
    sf.write(folder / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(folder / "huge.wav", sine(440, 0.5, 16000) * 1e30, 16000, subtype="FLOAT")
    for kind in ("zero_bytes", "no_samples", "nan", "text"):
        write_bad_file(folder, kind)
    (folder / "notes.txt").write_text("not audio")
    return folder


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory) -> Path:
    return write_audio_folder(tmp_path_factory.mktemp("audio"))


@pytest.fixture(scope="module")
def store_dir(audio_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store")
    summary = data.prepare([audio_folder], out, progress=False)
    assert (summary.added, summary.bad, summary.resumed) == (len(GOOD), len(BAD), 0)
    return out


def by_name(entries: list[dict], folder: Path) -> dict[str, dict]:
    return {str(Path(entry["path"]).relative_to(folder.resolve())): entry for entry in entries}


def test_prepare_indexes_good_files_and_lists_bad_ones(store_dir, audio_folder):
    entries = by_name(data.read_index(store_dir), audio_folder)
    assert {name: entry["frames"] for name, entry in entries.items()} == GOOD
    bad = {str(Path(path).relative_to(audio_folder.resolve())): reason
           for path, reason in data.read_bad_files(store_dir).items()}
    assert set(bad) == set(BAD)
    for name, word in BAD.items():
        assert word in bad[name], (name, bad[name])


def test_store_holds_float16_log_mel_and_float32_stats(store_dir, audio_folder):
    store = data.FeatureStore(store_dir)
    entries = data.read_index(store_dir)
    for index, entry in enumerate(entries):
        expected = audio.LogMel()(torch.from_numpy(audio.load_audio(entry["path"])))  # (frames, 80)
        stored = store.log_mel(index)
        assert stored.dtype == np.float16 and stored.shape == tuple(expected.shape)
        np.testing.assert_allclose(stored.astype(np.float32), expected.numpy(), rtol=1e-3, atol=1e-3)
        assert store.means[index] == pytest.approx(float(expected.mean()), rel=1e-5)
        assert store.stds[index] == pytest.approx(float(expected.std(correction=0)), rel=1e-5)


def test_prepare_second_run_is_a_no_op(store_dir, audio_folder):
    before = {path.name: path.read_bytes() for path in store_dir.iterdir()}
    summary = data.prepare([audio_folder], store_dir, progress=False)
    assert (summary.added, summary.bad, summary.resumed) == (0, 0, len(GOOD) + len(BAD))
    assert summary.total == len(GOOD)
    assert {path.name: path.read_bytes() for path in store_dir.iterdir()} == before


def test_prepare_recovers_from_an_interrupted_run(audio_folder, store_dir, tmp_path):
    out = tmp_path / "store"
    data.prepare([audio_folder / "sub"], out, shard_bytes=300 * data.FRAME_BYTES, progress=False)
    # A crash while the next clip was being written: orphan frames and half an index line.
    with open(data.shard_path(out, 1), "ab") as shard:
        shard.write(b"\x00" * 7 * data.FRAME_BYTES)
    with open(out / data.INDEX_FILE, "a") as index:
        index.write('{"path": "/half/written')
    summary = data.prepare([audio_folder], out, shard_bytes=300 * data.FRAME_BYTES, progress=False)
    assert summary.added == len(GOOD) - 2 and summary.total == len(GOOD)
    entries = data.read_index(out)
    # 300-frame shards: b 251 | c 201 | a 301 (alone: longer than a shard) | short 51 + stereo 201
    assert [entry["shard"] for entry in entries] == [0, 1, 2, 3, 3]
    reference = data.FeatureStore(store_dir)
    reference_rows = {entry["path"]: row for row, entry in enumerate(data.read_index(store_dir))}
    store = data.FeatureStore(out)
    for row, entry in enumerate(entries):
        np.testing.assert_array_equal(store.log_mel(row), reference.log_mel(reference_rows[entry["path"]]))


def test_prepare_with_workers_gives_the_same_store(audio_folder, store_dir, tmp_path):
    data.prepare([audio_folder], tmp_path, workers=2, progress=False)
    for name in (data.INDEX_FILE, data.BAD_FILE, "shard_00000.f16"):
        assert (tmp_path / name).read_bytes() == (store_dir / name).read_bytes(), name


def test_crops_are_normalised_reproducible_and_padded(store_dir):
    store = data.FeatureStore(store_dir)
    dataset = data.CropDataset(store, crop_frames=200, seed=3)
    for index in range(len(store)):
        crop, clip = dataset[index]
        assert crop.dtype == torch.float32 and crop.shape == (200, 80) and clip == index
        torch.testing.assert_close(crop, dataset[index][0], rtol=0, atol=0)
        frames = int(store.frames[index])
        start = dataset.crop_start(index)
        whole = audio.normalize(torch.from_numpy(store.log_mel(index).astype(np.float32)))
        valid = min(frames, 200)
        # stats are of the float32 log-mel, the frames float16: agreement to float16 precision
        torch.testing.assert_close(crop[:valid], whole[start: start + valid], rtol=0, atol=1e-2)
        if frames < 200:
            assert start == 0 and not crop[valid:].any()


def test_crops_depend_on_seed_epoch_and_index(store_dir):
    store = data.FeatureStore(store_dir)
    long_clip = int(np.argmax(store.frames))  # 301 frames: 102 possible starts
    dataset = data.CropDataset(store, seed=0)

    def starts(seed, epoch):
        dataset.seed = seed
        dataset.set_epoch(epoch)
        return [dataset.crop_start(long_clip) for _ in range(2)]

    assert starts(0, 0) == starts(0, 0)
    draws = {tuple(starts(seed, epoch)) for seed in range(4) for epoch in range(4)}
    assert len(draws) > 8


def test_loader_batches_and_worker_independence(store_dir):
    dataset = data.CropDataset(data.FeatureStore(store_dir), seed=1)
    loader = data.make_loader(dataset, batch_size=2, workers=0, seed=5)
    loader.set_epoch(1)
    first = [crops for crops, _ in loader]
    assert len(first) == len(GOOD) // 2 and first[0].shape == (2, 200, 80)
    loader.set_epoch(1)
    again = [crops for crops, _ in loader]
    parallel = data.make_loader(dataset, batch_size=2, workers=2, seed=5)
    parallel.set_epoch(1)
    for a, b, (c, _) in zip(first, again, parallel):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    loader.set_epoch(2)
    assert not all(torch.equal(a, b) for a, (b, _) in zip(first, loader))
    with pytest.raises(ValueError):
        data.make_loader(dataset, batch_size=len(GOOD) + 1)


def test_loader_batches_carry_their_clip_indices(store_dir):
    """Each batch says which clips it holds (train.py draws the mask noise from them): the
    sampler's order, with workers too, and each crop is that clip's crop."""
    dataset = data.CropDataset(data.FeatureStore(store_dir), seed=1)
    for workers in (0, 2):
        loader = data.make_loader(dataset, batch_size=2, workers=workers, seed=5)
        loader.set_epoch(3)
        batches = list(loader)
        order = list(loader.sampler)[: 2 * len(batches)]  # drop_last: 5 clips, 2 batches
        assert [clip for _, clips in batches for clip in clips.tolist()] == order
        assert all(clips.dtype == torch.int64 and clips.shape == (2,) for _, clips in batches)
        crops, clips = batches[-1]
        torch.testing.assert_close(crops[1], dataset[int(clips[1])][0], rtol=0, atol=0)


def test_loader_splits_between_distributed_ranks(store_dir, monkeypatch):
    dataset = data.CropDataset(data.FeatureStore(store_dir))
    seen = []
    for rank in range(2):
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        loader = data.make_loader(dataset, batch_size=1, distributed=True)
        seen.append(list(loader.sampler))
    assert len(seen[0]) == len(seen[1]) == len(GOOD) // 2
    assert not set(seen[0]) & set(seen[1])


def test_open_or_prepare_store(audio_folder, store_dir, tmp_path):
    assert data.open_or_prepare_store([store_dir]).root == store_dir
    store = data.open_or_prepare_store([audio_folder / "sub"], cache_dir=tmp_path)
    assert len(store) == 2 and store.root.parent == tmp_path


def test_demo_store(tmp_path):
    clips = data.synthetic_audio(n_clips=3, seconds=1.5, seed=7)
    assert len(clips) == 3 and all(c.dtype == np.float32 and c.shape == (24000,) for c in clips)
    assert all(0.5 < np.abs(c).max() <= 1 for c in clips)
    np.testing.assert_array_equal(clips[2], data.synthetic_audio(3, 1.5, seed=7)[2])
    store = data.prepare_demo(tmp_path / "demo", n_clips=6, seconds=2.5)
    assert len(store) == 6 and (store.frames == 251).all()
    assert data.read_bad_files(store.root) == {}
    crop, clip = data.CropDataset(store)[0]
    assert clip == 0 and crop.shape == (200, 80) and torch.isfinite(crop).all()
