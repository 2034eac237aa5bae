"""Audio loading and the log-mel frontend shared by pretraining and embedding.

Public API
----------
load_audio(path, sample_rate=16000) -> np.ndarray
    Any file libsndfile reads -> float32 mono samples at `sample_rate`.
LogMel()
    nn.Module: waveform (..., samples) -> log-mel (..., frames, 80).
normalize(x)
    Per-clip standardisation over time and mel: (x - mean) / (std + 1e-8).
AudioError
    The one exception raised for audio that cannot be used.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms hop -> 100 frames per second
N_MELS = 80
F_MIN, F_MAX = 50.0, 8000.0
LOG_EPS = torch.finfo(torch.float32).eps  # about 1.19e-7, added before the log
NORM_EPS = 1e-8  # added to the std in `normalize`


class AudioError(Exception):
    """A file that cannot be used as audio: unreadable, empty, non-finite, ..."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono samples at `sample_rate`.

    Channels are averaged; a different rate is resampled with soxr (quality 'HQ').
    Silence is returned as is: deciding what to do with it is the caller's job.

    Returns: (samples,) float32.
    Raises: AudioError if the file cannot be read, holds no samples, or holds NaN/Inf.
    """
    try:
        audio, file_rate = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except (sf.SoundFileError, OSError) as error:
        raise AudioError(path, f"unreadable ({error})") from error
    if audio.size == 0:
        raise AudioError(path, "empty (0 samples)")
    if not np.isfinite(audio).all():
        raise AudioError(path, "non-finite samples (NaN or Inf)")
    mono = audio.mean(axis=1)  # (samples,)
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


# ---------------------------------------------------------------------------
# Log-mel frontend
# ---------------------------------------------------------------------------


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 * log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int = N_FFT // 2 + 1,
    n_mels: int = N_MELS,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = F_MIN,
    f_max: float = F_MAX,
) -> np.ndarray:
    """Triangular HTK mel filters without area normalisation, float64 (n_freqs, n_mels).

    Same matrix as torchaudio.functional.melscale_fbanks(norm=None, mel_scale='htk')
    and librosa.filters.mel(htk=True, norm=None).T: filter m rises linearly from
    edge m to edge m+1 and falls to edge m+2, with n_mels + 2 edges evenly spaced in mel.
    """
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_freqs)  # (n_freqs,)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (n_mels+2,)
    widths = np.diff(edges)  # (n_mels+1,)
    offsets = edges[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels+2)
    rising = -offsets[:, :-2] / widths[:-1]  # (n_freqs, n_mels)
    falling = offsets[:, 2:] / widths[1:]  # (n_freqs, n_mels)
    return np.maximum(0.0, np.minimum(rising, falling))


def periodic_hann(length: int = N_FFT) -> np.ndarray:
    """Periodic Hann window (the 'hann' of scipy.signal.get_window / torch.hann_window), float64."""
    return 0.5 - 0.5 * np.cos(2.0 * math.pi * np.arange(length) / length)


class LogMel(nn.Module):
    """Waveform (..., samples) -> log-mel spectrogram (..., frames, 80).

    STFT with n_fft 400, periodic Hann window 400, hop 160, centred frames
    (reflect padding), power 2; 80 HTK mel bins from 50 to 8000 Hz without
    area normalisation; then log(x + float32 eps). frames = 1 + samples // 160
    (inputs shorter than 201 samples are first zero-padded to 201).

    The window and filterbank are non-persistent buffers (they follow `.to(device)`
    but are not saved in state dicts). They are built in float64 and stored in
    `dtype`; the computation runs in the input's dtype, so for a float64 reference
    build `LogMel(dtype=torch.float64)`.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("window", torch.tensor(periodic_hann(), dtype=dtype), persistent=False)
        self.register_buffer(
            "filterbank", torch.tensor(mel_filterbank(), dtype=dtype), persistent=False
        )  # (201, 80)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # Reflect padding needs more than n_fft // 2 samples: zero-pad very short clips.
        min_samples = N_FFT // 2 + 1
        if waveform.shape[-1] < min_samples:
            waveform = nn.functional.pad(waveform, (0, min_samples - waveform.shape[-1]))
        leading = waveform.shape[:-1]
        flat = waveform.reshape(-1, waveform.shape[-1])  # (batch, samples)
        spectrum = torch.stft(
            flat,
            n_fft=N_FFT,
            hop_length=HOP,
            win_length=N_FFT,
            window=self.window.to(flat.dtype),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # (batch, 201, frames) complex
        power = torch.view_as_real(spectrum).pow(2).sum(-1)  # (batch, 201, frames)
        mel = power.transpose(-1, -2) @ self.filterbank.to(power.dtype)  # (batch, frames, 80)
        log_mel = torch.log(mel + LOG_EPS)
        return log_mel.reshape(*leading, *log_mel.shape[-2:])  # (..., frames, 80)


def normalize(x: torch.Tensor, dim: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Standardise each clip with its own statistics: (x - mean) / (std + 1e-8).

    x: (..., frames, mels); statistics over `dim` (default: the whole clip).
    The std is the population std (ddof 0), as numpy's default in the official pipelines.
    """
    mean = x.mean(dim=dim, keepdim=True)
    std = x.std(dim=dim, correction=0, keepdim=True)
    return (x - mean) / (std + NORM_EPS)
