"""Tests for data.py: audio loading and the log-mel frontend."""
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

import data

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TASKS = SHARED / "tasks"
EPS = np.finfo(np.float32).eps


def real_clips() -> list[Path]:
    """A few real 16 kHz clips: speech, a drum stroke zero-padded at the end, a spoken digit."""
    patterns = [
        "ravdess_emotion-v1.0-full/16000/fold00/*.flac",
        "mridangam_stroke-v1.0-full/16000/fold00/*.flac",
        "fsdd-v1.0-full/16000/fold00/*.flac",
    ]
    clips = [sorted(TASKS.glob(pattern))[0] for pattern in patterns if any(TASKS.glob(pattern))]
    if not clips:
        pytest.skip(f"no shared audio under {TASKS}")
    return clips


def librosa_log_mel(audio: np.ndarray, htk: bool = True, eps: float = EPS) -> np.ndarray:
    """Float64 reference: librosa with the SPEC's frontend arguments -> (frames, 80)."""
    mel = librosa.feature.melspectrogram(
        y=audio.astype(np.float64), sr=16000, n_fft=400, hop_length=160, win_length=400,
        window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=80,
        fmin=50.0, fmax=8000.0, htk=htk, norm=None, dtype=np.float64,
    )  # (80, frames)
    return np.log(mel + eps).T


def sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------------------
# LogMel
# ---------------------------------------------------------------------------


def test_filterbank_matches_librosa():
    reference = librosa.filters.mel(
        sr=16000, n_fft=400, n_mels=80, fmin=50, fmax=8000, htk=True, norm=None, dtype=np.float64
    ).T
    np.testing.assert_allclose(data.mel_filterbank(), reference, rtol=0, atol=1e-12)


def test_log_mel_float64_matches_librosa():
    frontend = data.LogMel(dtype=torch.float64)
    for path in real_clips():
        audio = data.load_audio(path)
        ours = frontend(torch.from_numpy(audio.astype(np.float64))).numpy()
        reference = librosa_log_mel(audio)
        assert ours.shape == reference.shape == (1 + len(audio) // 160, 80)
        assert np.abs(ours - reference).max() <= 1e-4, path.name  # typically ~1e-13


def test_log_mel_float32_close_to_float64_reference():
    frontend = data.LogMel()
    for path in real_clips():
        audio = data.load_audio(path)
        ours = frontend(torch.from_numpy(audio))
        assert ours.dtype == torch.float32
        difference = np.abs(ours.numpy() - librosa_log_mel(audio))
        # float32 FFT rounding: ~1e-6 on average, up to ~1e-3 in near-silent bins (see SPEC).
        assert difference.mean() <= 1e-4, path.name


@pytest.mark.parametrize("variant", [{"htk": False}, {"eps": 1e-10}, {"eps": 1e-6}])
def test_librosa_comparison_detects_wrong_variants(variant):
    """The reference comparison above is sensitive to the mel scale and the log eps."""
    audio = data.load_audio(real_clips()[0])
    ours = data.LogMel(dtype=torch.float64)(torch.from_numpy(audio.astype(np.float64))).numpy()
    assert np.abs(ours - librosa_log_mel(audio, **variant)).max() > 1e-4


def test_log_mel_shapes_batches_and_short_inputs():
    frontend = data.LogMel()
    batch = torch.randn(3, 2, 16000)
    out = frontend(batch)
    assert out.shape == (3, 2, 101, 80)
    torch.testing.assert_close(out[1, 0], frontend(batch[1, 0]))
    for samples in (0, 1, 150, 200, 201, 401):  # below 201 samples reflect padding is impossible
        out = frontend(torch.randn(samples))
        assert out.shape[-1] == 80 and out.shape[0] >= 1 and torch.isfinite(out).all()


def test_log_mel_buffers_follow_module_and_are_not_saved():
    frontend = data.LogMel()
    assert frontend.state_dict() == {}
    assert frontend.double().window.dtype == torch.float64
    assert frontend(torch.randn(1000, dtype=torch.float64)).dtype == torch.float64


def test_normalize_whole_clip_population_std():
    x = torch.randn(4, 200, 80, dtype=torch.float64) * 3 + 5
    y = data.normalize(x)
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
    audio = data.load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (8000,)
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("rate", [44100, 8000])
def test_load_audio_resamples_to_16k(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.flac"
    sf.write(path, sine(1000, 1.0, rate), rate)
    audio = data.load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 1
    assert abs(peak_frequency(audio, 16000) - 1000) <= 2
    assert 0.45 < np.abs(audio[1000:-1000]).max() < 0.55


def test_load_audio_keeps_silence(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    assert not data.load_audio(path).any()


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
        audio = sine(440, 0.5, 16000)
        audio[100] = np.nan
        sf.write(path, audio, 16000, subtype="FLOAT")
    elif kind == "inf":
        path = folder / "inf.wav"
        audio = sine(440, 0.5, 16000)
        audio[100] = np.inf
        sf.write(path, audio, 16000, subtype="FLOAT")
    elif kind == "text":
        path = folder / "text.wav"
        path.write_text("this is not audio\n" * 100)
    return path


@pytest.mark.parametrize("kind", ["missing", "zero_bytes", "no_samples", "nan", "inf", "text"])
def test_load_audio_rejects_bad_files(tmp_path, kind):
    path = write_bad_file(tmp_path, kind)
    with pytest.raises(data.AudioError) as caught:
        data.load_audio(path)
    assert path.name in str(caught.value)
    assert caught.value.reason
