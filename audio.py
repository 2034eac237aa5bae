"""The paper's audio frontend: any audio file -> 16 kHz mono -> log-mel -> per-clip standardised.

The recipe every model here shares (MW-MAE, MAE, AudioMAE++ pretraining and the HEAR
embeddings alike):

1. Read the file (any format libsndfile reads), average the channels, resample to 16 kHz
   (`load_audio`; soxr, quality 'HQ'). Anything that is not a regular file is refused unopened.
2. Short-time Fourier transform: 25 ms periodic Hann window (400 samples), 10 ms hop
   (160 samples, so 100 frames per second), centred frames with reflect padding, power
   spectrum (`LogMel`).
3. 80 triangular mel filters, HTK scale, 50 Hz to 8 kHz, no area normalisation
   (`mel_filterbank`; the same matrix as librosa's and torchaudio's).
4. log(mel + float32 eps): a clip of n samples gives 1 + n // 160 frames of 80 values.
5. Standardise each clip with its own mean and (population) std over time and mel
   (`normalize`). Pretraining then takes 2-s crops (200 frames) of the standardised clip;
   the model cuts them into 4 x 16 patches (40 ms x 16 mel bins).

Public API
----------
    find_files(inputs, exclude=None, skipped=None) -> list[str]
        The regular files under folders/files, sorted, under the names the user has; the
        rest (FIFOs, devices, broken links, link loops) is reported, never opened.
    SAMPLE_RATE, N_FFT, HOP, N_MELS, F_MIN, F_MAX, LOG_EPS, NORM_EPS
        The settings above (feature stores record them in store.json).
    load_audio(path, sample_rate=16000) -> np.ndarray
        float32 mono samples (samples,); raises AudioError.
    LogMel(dtype=torch.float32)
        nn.Module: waveform (..., samples) -> log-mel (..., frames, 80).
    normalize(x, dim=(-2, -1))
        Per-clip standardisation over time and mel: (x - mean) / (std + 1e-8).
    check_finite(log_mel, path)
        Raise AudioError when the frontend's output of `path` holds NaN/Inf.
    AudioError
        The one exception raised for audio that cannot be used (`.path`, `.reason`).
    stat_problem(path)
        Why `path` is not a regular file ("" if it is), found without opening it.

Command line: `python audio.py FILE` prints the length of FILE and the shape and statistics
of its log-mel. This module imports no model code.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import stat
from pathlib import Path
from typing import Iterable

import click
import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

import files

logger = logging.getLogger(__name__)

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
        super().__init__(f"{files.shown(path)}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) when pickled across processes
        return AudioError, (self.path, self.reason)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


FILE_KINDS = {  # what the stat mode of something that is not a regular file says it is
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFDIR: "folder",
}


def stat_problem(path: str | Path) -> tuple[os.stat_result | None, str]:
    """(stat of `path` following links, "") for a regular file, else (stat or None, why not).

    Only stat is used, never open: opening a FIFO blocks until someone writes to it, and a
    device such as /dev/zero never ends. Reasons name what the user has (a broken link,
    a link loop) rather than where a link points.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None, "broken symbolic link" if os.path.islink(path) else "no such file"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None, "symbolic link loop"
        return None, f"cannot be read ({error.strerror})"
    if stat.S_ISREG(status.st_mode):
        return status, ""
    kind = FILE_KINDS.get(stat.S_IFMT(status.st_mode), "unknown type")
    return status, f"not a regular file ({kind})"


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono samples at `sample_rate`.

    Channels are averaged; a different rate is resampled with soxr (quality 'HQ').
    Silence is returned as is: deciding what to do with it is the caller's job.
    Anything that is not a regular file (FIFO, device, broken link, ...) is refused
    before it is opened, under the name given.

    Returns: (samples,) float32.
    Raises: AudioError if the file is not a regular file, cannot be read, holds no
    samples, or holds NaN/Inf.
    """
    _, problem = stat_problem(path)
    if problem:
        raise AudioError(path, problem)
    try:
        # bytes: soundfile cannot encode a str name that is not valid UTF-8 (surrogate escapes)
        audio, file_rate = sf.read(os.fsencode(path), dtype="float32",
                                   always_2d=True)  # (samples, channels)
    except (sf.SoundFileError, OSError) as error:
        why = getattr(error, "error_string", None) or getattr(error, "strerror", None) or error
        raise AudioError(path, f"unreadable ({why})") from error
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


def check_finite(log_mel: torch.Tensor | np.ndarray, path: str | Path) -> None:
    """Raise AudioError(path, "log-mel not finite ...") unless every value of `log_mel` is finite.

    Finite samples can still overflow the frontend: float WAVs may hold values like 1e30,
    whose power spectrum is inf in float32. Call this after the frontend wherever audio
    enters (a NaN row would silently poison a probe or a training batch). `log_mel` is any
    tensor or array computed from the one file `path`, e.g. (frames, 80) or (chunks, frames, 80).
    """
    finite = torch.isfinite if torch.is_tensor(log_mel) else np.isfinite
    if not finite(log_mel).all():
        raise AudioError(path, "log-mel not finite (samples far beyond full scale)")


# ---------------------------------------------------------------------------
# Finding audio files in folders
# ---------------------------------------------------------------------------


def find_files(
    inputs: Iterable[str | Path],
    exclude: str | Path | None = None,
    skipped: dict[str, str] | None = None,
) -> list[str]:
    """Every regular file under the given folders (and the given files), sorted.

    Paths are absolute but not resolved, so each file keeps the name the user has: a
    symbolic link is followed (to a file or a folder) and listed under its own name. The
    same file reached twice (through a link, or overlapping inputs) is listed once, under
    the first name met (inputs in order, each folder's names sorted); a folder is walked
    once, so links that point back up the tree do not loop.
    Nothing is filtered by extension: whatever libsndfile cannot read is the caller's bad file.
    Files directly in `exclude` (the store's own files) are left out; its subfolders are not.

    Anything else (FIFO, socket, device, broken link, link loop, unreadable folder) is only
    stat'ed, never opened (a FIFO would block), and is not listed: it goes into `skipped` as
    {path: reason} when a dict is given, and is logged as a warning otherwise.
    """
    excluded = stat_problem(exclude)[0] if exclude is not None else None
    excluded_id = (excluded.st_dev, excluded.st_ino) if excluded else None
    found: dict[tuple[int, int], str] = {}  # (device, inode) of a file -> its first name
    problems: dict[str, str] = {}
    walked: set[tuple[int, int]] = set()  # folders already walked
    for item in inputs:
        pending = [(absolute(item), False)]  # (path, directly in the excluded folder)
        while pending:
            path, in_excluded = pending.pop()
            status, problem = stat_problem(path)
            file_id = (status.st_dev, status.st_ino) if status else None
            if status is not None and stat.S_ISDIR(status.st_mode):
                if file_id not in walked:
                    walked.add(file_id)
                    children = list_folder(path, problems)
                    pending.extend((child, file_id == excluded_id) for child in reversed(children))
            elif in_excluded:
                continue
            elif problem:
                problems[str(path)] = problem
            else:
                found.setdefault(file_id, str(path))
    report_skipped(problems, skipped)
    return sorted(found.values())


def absolute(path: str | Path) -> Path:
    """`path` made absolute without following links: "." and ".." are folded away unless
    that would change where it leads (a ".." after a link to a folder)."""
    unfolded = Path(path).absolute()
    folded = Path(os.path.abspath(path))
    if folded == unfolded or os.path.realpath(folded) == os.path.realpath(unfolded):
        return folded
    return unfolded


def list_folder(folder: Path, problems: dict[str, str]) -> list[Path]:
    """The entries of `folder` in sorted order; an unreadable folder is noted in `problems`."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        problems[str(folder)] = f"unreadable folder ({error.strerror})"
        return []
    return [folder / name for name in names]


def report_skipped(problems: dict[str, str], skipped: dict[str, str] | None) -> None:
    """Hand the entries find_files left out to the caller's dict, or log them."""
    if skipped is not None:
        skipped.update(problems)
        return
    for path, reason in sorted(problems.items()):
        logger.warning("skipped %s: %s", files.shown(path), reason)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
def main(file: str) -> None:
    """Print the length of FILE and the shape and statistics of its log-mel."""
    try:
        samples = load_audio(file)  # (samples,)
        with torch.no_grad():
            log_mel = LogMel()(torch.from_numpy(samples))  # (frames, 80)
        check_finite(log_mel, file)
    except AudioError as error:
        raise click.ClickException(str(error)) from None
    std, mean = torch.std_mean(log_mel, correction=0)
    click.echo(f"{files.shown(file)}: {len(samples) / SAMPLE_RATE:.2f} s -> log-mel "
               f"{tuple(log_mel.shape)} (frames of 10 ms, mel bins); min {log_mel.min():.2f}, "
               f"max {log_mel.max():.2f}, mean {mean:.2f}, std {std:.2f}")


if __name__ == "__main__":
    main()
