"""Audio loading, the log-mel frontend, the pretraining feature store and its datasets.

Public API
----------
Frontend
    load_audio(path, sample_rate=16000) -> np.ndarray
        Any file libsndfile reads -> float32 mono samples at `sample_rate` (anything but a
        regular file is refused unopened).
    find_files(inputs, exclude=None, skipped=None) -> list[str]
        The regular files under folders/files, sorted, under the names the user has; the
        rest (FIFOs, devices, broken links, link loops) is reported, never opened.
    LogMel(dtype=torch.float32)
        nn.Module: waveform (..., samples) -> log-mel (..., frames, 80).
    normalize(x, dim=(-2, -1))
        Per-clip standardisation over time and mel: (x - mean) / (std + 1e-8).
    check_finite(log_mel, path)
        Raise AudioError when the frontend's output of `path` holds NaN/Inf.
    AudioError
        The one exception raised for audio that cannot be used.
Feature store (log-mel computed once, read many times during pretraining)
    prepare(inputs, out, workers=1) -> PrepareSummary
        Walk audio folders, write/extend the store `out` (resumable).
    FeatureStore(root)
        Read access: len(store), store.frames/means/stds, store.log_mel(i, start, stop).
    open_or_prepare_store(paths, cache_dir="cache/stores", workers=1) -> FeatureStore
        A store directory as is, or audio folders prepared into a store cached by content
        (file names, sizes and mtimes).
    prepare_demo(out="cache/demo_store", n_clips=256, seconds=4.0, seed=0) -> FeatureStore
        The built-in DEMO store of synthetic sounds (smoke tests, `python train.py` without data).
    synthetic_audio(n_clips, seconds, seed) -> list[np.ndarray]
        The demo set's waveforms.
Pretraining data
    CropDataset(store, crop_frames=200, seed=0)
        Item i -> a reproducible random normalised crop (200, 80) of clip i; set_epoch(epoch).
    make_loader(dataset, batch_size, workers=0, seed=0, distributed=None) -> EpochLoader
        Shuffled DataLoader (DistributedSampler, drop_last); call loader.set_epoch(epoch).

Command line: `python data.py prepare AUDIO_DIR... --out STORE [--workers N]`,
`python data.py demo [--out STORE]`, `python data.py speed STORE` (crops per second).

Store format (directory)
------------------------
store.json      format name and frontend settings (checked when the store is opened; written
                atomically).
shard_00000.f16 raw little-endian float16 log-mel frames, rows of 80 values, clips back to
                back; a new shard starts when the next clip would pass ~256 MiB. NOT
                normalised: normalisation happens at crop time with the whole-clip statistics.
index.jsonl     one JSON object per clip: {"path", "shard", "offset", "frames", "mean", "std"}
                (offset and frames in frames; mean and std of the clip's float32 log-mel,
                population std).
bad_files.tsv   path<TAB>reason for every rejected file: not a regular file (FIFO, device,
                broken link, link loop), unreadable or not audio, empty, NaN/Inf samples,
                silent (peak |sample| below 1e-6: digital silence, as 16-bit audio cannot be
                that quiet otherwise), or a non-finite log-mel.
read_index(root) and read_bad_files(root) return their contents. Paths are absolute, not
resolved (a link keeps its own name); a name that is not valid UTF-8 is kept exactly
(surrogate escapes in Python, its own bytes on disk).

Crash safety: for every clip the frames are appended to the shard and flushed before its
index line is appended and flushed; shards are fsynced when closed. A killed run therefore
loses only the clip being written. On the next run `prepare` drops a partial last index
line and any entry whose frames are missing from its shard, cuts the last shard back to its
last indexed frame, and goes on with the files that are neither indexed nor listed as bad
(delete bad_files.tsv to retry those).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import click
import numpy as np
import soundfile as sf
import soxr
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

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


# ---------------------------------------------------------------------------
# Feature store: writing
# ---------------------------------------------------------------------------

STORE_FORMAT = {
    "format": "mwmae-logmel-store-v1",
    "sample_rate": SAMPLE_RATE,
    "n_fft": N_FFT,
    "hop": HOP,
    "n_mels": N_MELS,
    "f_min": F_MIN,
    "f_max": F_MAX,
    "dtype": "float16",
}
FRAME_BYTES = N_MELS * np.dtype(np.float16).itemsize  # one stored frame: 80 float16
SHARD_BYTES = 256 * 2**20
SILENCE_PEAK = 1e-6  # a clip whose peak |sample| is below this (-120 dBFS) counts as silent
INDEX_FILE, BAD_FILE, META_FILE = "index.jsonl", "bad_files.tsv", "store.json"


def shard_path(root: Path, shard: int) -> Path:
    return root / f"shard_{shard:05d}.f16"


@dataclass
class ClipFeatures:
    """What a worker sends back for one file: its log-mel, or why it was rejected."""

    path: str
    log_mel: np.ndarray | None  # (frames, 80) float16, not normalised; None for a bad file
    mean: float = 0.0  # whole-clip statistics of the float32 log-mel
    std: float = 0.0
    error: str = ""


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


def extract_features(path: str) -> ClipFeatures:
    """Load one file and compute its log-mel; never raises, bad files come back with `error`."""
    try:
        audio = load_audio(path)  # (samples,)
        if np.abs(audio).max() < SILENCE_PEAK:
            raise AudioError(path, f"silent (peak below {SILENCE_PEAK:g})")
        with torch.no_grad():
            log_mel = LogMel()(torch.from_numpy(audio))  # (frames, 80) float32
        check_finite(log_mel, path)
    except AudioError as error:
        return ClipFeatures(path, None, error=error.reason)
    except Exception as error:  # noqa: BLE001 - one odd file must not stop a long run
        return ClipFeatures(path, None, error=f"unexpected {type(error).__name__}: {error}")
    std, mean = torch.std_mean(log_mel, correction=0)  # population std, as in `normalize`
    return ClipFeatures(path, log_mel.numpy().astype(np.float16), float(mean), float(std))


def open_text(path: str | Path, mode: str):
    """A store text file opened so that any file name round-trips: UTF-8 with surrogate
    escapes (a name that is not valid UTF-8 is written back as its own bytes), no newline
    translation (csv quotes names holding tabs or newlines)."""
    return open(path, mode, encoding="utf-8", errors="surrogateescape", newline="")


def read_index(root: str | Path) -> list[dict]:
    """The complete entries of a store's index.jsonl (a partial last line is ignored)."""
    path = Path(root) / INDEX_FILE
    if not path.exists():
        return []
    entries = []
    for line in files.read_text(path).splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the line an interrupted run was writing
    return entries


def read_bad_files(root: str | Path) -> dict[str, str]:
    """{path: reason} from a store's bad_files.tsv (names come back exactly, see `open_text`)."""
    path = Path(root) / BAD_FILE
    if not path.exists():
        return {}
    with open_text(path, "r") as file:
        return {row[0]: row[1] for row in csv.reader(file, delimiter="\t") if len(row) == 2}


def recover_index(root: Path) -> list[dict]:
    """Make index and shards consistent after an interrupted run; return the valid entries.

    Keeps the entries up to the first one that is unreadable or whose frames are not all in
    its shard file, rewrites the index atomically if anything was dropped, cuts the last
    shard back to its last indexed frame and removes shards after it.
    """
    shard_sizes = {int(path.stem.split("_")[1]): path.stat().st_size
                   for path in root.glob("shard_*.f16")}  # bytes
    entries = []
    for entry in read_index(root):
        if shard_sizes.get(entry["shard"], -1) < (entry["offset"] + entry["frames"]) * FRAME_BYTES:
            break
        entries.append(entry)
    index = root / INDEX_FILE
    if index.exists() and len(files.read_text(index).splitlines()) != len(entries):
        logger.warning("%s: dropping index entries of an interrupted run", files.shown(index))
        files.write_text(index, "".join(json.dumps(entry) + "\n" for entry in entries))
    last, used = last_shard_fill(entries)
    for shard in shard_sizes:
        if shard > last:
            shard_path(root, shard).unlink()
        elif shard == last:
            os.truncate(shard_path(root, shard), used * FRAME_BYTES)
    return entries


def last_shard_fill(entries: list[dict]) -> tuple[int, int]:
    """(number of the last shard, frames used in it) for index entries in writing order."""
    if not entries:
        return 0, 0
    last = entries[-1]
    return last["shard"], last["offset"] + last["frames"]


class StoreWriter:
    """Appends clips and bad files to a store directory (see "Store format" above)."""

    def __init__(self, root: str | Path, shard_bytes: int = SHARD_BYTES):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        check_or_write_format(self.root)
        entries = recover_index(self.root)
        self.indexed = {entry["path"] for entry in entries}
        self.bad = set(read_bad_files(self.root))
        self.shard_frames = max(1, shard_bytes // FRAME_BYTES)
        self.shard, self.used = last_shard_fill(entries)
        self.shard_file = open(shard_path(self.root, self.shard), "ab")
        self.index_file = open_text(self.root / INDEX_FILE, "a")
        self.bad_file = open_text(self.root / BAD_FILE, "a")

    def add(self, clip: ClipFeatures) -> None:
        """Append a good clip: frames to the shard first, then its index line."""
        frames = len(clip.log_mel)
        if self.used and self.used + frames > self.shard_frames:
            self._next_shard()
        self.shard_file.write(clip.log_mel.astype("<f2").tobytes())
        self.shard_file.flush()
        entry = dict(path=clip.path, shard=self.shard, offset=self.used, frames=frames,
                     mean=clip.mean, std=clip.std)
        self.index_file.write(json.dumps(entry) + "\n")
        self.index_file.flush()
        self.used += frames
        self.indexed.add(clip.path)

    def add_bad(self, path: str, reason: str) -> None:
        csv.writer(self.bad_file, delimiter="\t").writerow([path, reason])
        self.bad_file.flush()
        self.bad.add(path)

    def _next_shard(self) -> None:
        self._close_shard()
        self.shard, self.used = self.shard + 1, 0
        self.shard_file = open(shard_path(self.root, self.shard), "wb")

    def _close_shard(self) -> None:
        self.shard_file.flush()
        os.fsync(self.shard_file.fileno())
        self.shard_file.close()

    def close(self) -> None:
        self._close_shard()
        for file in (self.index_file, self.bad_file):
            os.fsync(file.fileno())
            file.close()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_or_write_format(root: Path) -> None:
    """Write store.json in a new store; refuse a store made with other frontend settings."""
    meta = root / META_FILE
    if not meta.exists():
        files.write_text(meta, json.dumps(STORE_FORMAT, indent=1) + "\n")
        return
    try:
        settings = json.loads(files.read_text(meta))
    except json.JSONDecodeError as error:
        raise ValueError(f"{files.shown(meta)} is not a store description ({error})") from None
    if settings != STORE_FORMAT:
        raise ValueError(f"{files.shown(root)} holds a store with other settings: "
                         f"{json.dumps(settings)}")


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


@dataclass
class PrepareSummary:
    """What one `prepare` run did; str() gives the one-line summary."""

    added: int  # clips computed in this run
    added_hours: float
    resumed: int  # files skipped because an earlier run already handled them
    bad: int  # files rejected in this run
    total: int  # clips in the store now
    store: str

    def __str__(self) -> str:
        return (f"{counted(self.added, 'clip')} added ({self.added_hours:.2f} h of audio), "
                f"{self.resumed} already done, {counted(self.bad, 'bad file')} "
                f"(see {files.shown(Path(self.store) / BAD_FILE)}); "
                f"the store holds {counted(self.total, 'clip')}")


def counted(number: int, noun: str) -> str:
    """'1 clip', '2 clips', '0 clips'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def described(inputs: list[str | Path], limit: int = 3) -> str:
    """The inputs of a command as one short printable phrase."""
    names = [files.shown(item) for item in inputs[:limit]]
    more = len(inputs) - limit
    return ", ".join(names) + (f" and {counted(more, 'more path')}" if more > 0 else "")


def _init_worker() -> None:
    torch.set_num_threads(1)  # the parallelism is across files


@contextlib.contextmanager
def parallel_map(workers: int) -> Iterator[Callable]:
    """An ordered, lazy map over `workers` processes (in-process for workers <= 1).

    Each file is computed with one torch thread: intra-op threads only add overhead on
    arrays this small (measured: 6 ms CPU per 3.7 s clip with 1 thread, 35 ms with 2).
    """
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield map
        finally:
            torch.set_num_threads(threads)
        return
    # spawn: forking a process whose torch/OpenMP threads are running can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield lambda function, items: pool.imap(function, items, chunksize=4)


def prepare(
    inputs: Iterable[str | Path],
    out: str | Path,
    workers: int = 1,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> PrepareSummary:
    """Compute the log-mel of every file under `inputs` into the store `out`.

    Resumable: files already in the index or in bad_files.tsv are skipped. Results are
    written in sorted path order whatever `workers` is, so the store does not depend on it.
    Entries that are not regular files (see `find_files`) are listed in bad_files.tsv.

    Raises: ValueError when `inputs` hold no files at all (nothing is written then), or
    when the store ends up without a single clip (bad_files.tsv says why).
    """
    out, inputs = Path(out), list(inputs)
    skipped: dict[str, str] = {}
    paths = find_files(inputs, exclude=out, skipped=skipped)
    if not paths and not skipped:
        raise ValueError(f"no audio files found under {described(inputs)}")
    with StoreWriter(out, shard_bytes) as writer:
        new_skipped = {path: reason for path, reason in skipped.items() if path not in writer.bad}
        for path, reason in sorted(new_skipped.items()):
            writer.add_bad(path, reason)
        todo = [path for path in paths if path not in writer.indexed and path not in writer.bad]
        added, bad, frames = 0, len(new_skipped), 0
        with parallel_map(workers) as map_fn:
            results = map_fn(extract_features, todo)
            for clip in tqdm(results, total=len(todo), desc="log-mel", unit="file",
                             disable=not progress):
                if clip.log_mel is None:
                    writer.add_bad(clip.path, clip.error)
                    bad += 1
                else:
                    writer.add(clip)
                    added, frames = added + 1, frames + len(clip.log_mel)
        total = len(writer.indexed)
    if total == 0:
        raise ValueError(f"no readable audio under {described(inputs)}: "
                         f"{counted(len(paths) + len(skipped), 'file')} skipped "
                         f"(see {files.shown(out / BAD_FILE)})")
    resumed = len(paths) - len(todo) + len(skipped) - len(new_skipped)
    return PrepareSummary(added, frames * HOP / SAMPLE_RATE / 3600, resumed, bad, total, str(out))


# ---------------------------------------------------------------------------
# Feature store: reading
# ---------------------------------------------------------------------------


class FeatureStore:
    """Read access to a prepared store.

    Per-clip columns are numpy arrays (cheap to share with DataLoader workers): `shards`,
    `offsets`, `frames`, `means`, `stds`. Shards are memory-mapped lazily in each process
    (at most MAX_OPEN_SHARDS at once, least recently used closed first).
    """

    MAX_OPEN_SHARDS = 256  # each open memmap holds a file descriptor

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.is_store(self.root):
            raise FileNotFoundError(f"{self.root} is not a feature store (no {META_FILE})")
        check_or_write_format(self.root)
        entries = read_index(self.root)
        self.shards = np.array([e["shard"] for e in entries], dtype=np.int64)
        self.offsets = np.array([e["offset"] for e in entries], dtype=np.int64)
        self.frames = np.array([e["frames"] for e in entries], dtype=np.int64)
        self.means = np.array([e["mean"] for e in entries], dtype=np.float32)
        self.stds = np.array([e["std"] for e in entries], dtype=np.float32)
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    @staticmethod
    def is_store(path: str | Path) -> bool:
        return (Path(path) / META_FILE).is_file()

    def __len__(self) -> int:
        return len(self.frames)

    def log_mel(self, index: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames [start, stop) of clip `index`: a float16 (frames, 80) view of the shard."""
        frames = int(self.frames[index])
        stop = frames if stop is None else min(stop, frames)
        offset = int(self.offsets[index])
        return self._shard(int(self.shards[index]))[offset + start: offset + stop]

    def _shard(self, shard: int) -> np.memmap:
        mapped = self._open.pop(shard, None)
        if mapped is None:
            mapped = np.memmap(shard_path(self.root, shard), dtype="<f2", mode="r")
            mapped = mapped.reshape(-1, N_MELS)
        self._open[shard] = mapped  # now the most recently used
        if len(self._open) > self.MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        return mapped

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # each process maps the shards itself
        return state


# ---------------------------------------------------------------------------
# Pretraining data
# ---------------------------------------------------------------------------


class CropDataset(Dataset):
    """Item i -> a random `crop_frames` crop of clip i, normalised with whole-clip statistics.

    Returns float32 (crop_frames, 80) = (log_mel - clip mean) / (clip std + 1e-8).
    The crop start depends only on (seed, epoch, i), so crops are reproducible, identical
    with any number of DataLoader workers, and a resumed run sees the same crops: call
    `set_epoch(epoch)` before each epoch (EpochLoader.set_epoch does).
    Clips shorter than `crop_frames` are padded at the end with zeros, i.e. with the clip's
    mean level after normalisation (a neutral value that adds nothing to the clip's statistics).
    """

    def __init__(self, store: FeatureStore, crop_frames: int = 200, seed: int = 0):
        self.store = store
        self.crop_frames = crop_frames
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def crop_start(self, index: int) -> int:
        """The first frame of item `index`'s crop in the current epoch."""
        spare = max(int(self.store.frames[index]) - self.crop_frames, 0)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(0, spare + 1))

    def __getitem__(self, index: int) -> torch.Tensor:
        start = self.crop_start(index)
        frames = self.store.log_mel(index, start, start + self.crop_frames)  # (<=crop, 80) f16
        crop = np.zeros((self.crop_frames, N_MELS), dtype=np.float32)  # the zeros are the padding
        valid = crop[: len(frames)]
        np.subtract(frames, self.store.means[index], out=valid)
        valid *= 1 / (self.store.stds[index] + NORM_EPS)
        return torch.from_numpy(crop)  # (crop_frames, 80)


class EpochLoader(DataLoader):
    """A DataLoader whose `set_epoch` reseeds both the shuffling and the crops, and whose
    worker processes leave SIGINT and SIGTERM to the main process.

    A job scheduler (SLURM, Kubernetes, systemd, `timeout`) or Ctrl-C signals every process
    of the job: a worker killed by it would make the main process fail ("DataLoader worker
    is killed by signal") before it can write its checkpoint. So workers ignore SIGINT, and
    obey a SIGTERM only when the main process sends it (torch and multiprocessing end
    workers that way). Workers start with both signals blocked, so none is hit before its
    init function has set this up; they still end with the main process (torch's watchdog).
    """

    STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, self.STOP_SIGNALS)
        try:
            return super().__iter__()  # starts the workers, which inherit the mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    @staticmethod
    def leave_stop_signals_to_main(worker_id: int) -> None:
        """Worker init: ignore SIGINT; keep SIGTERM blocked, for a thread that waits for it
        (this replaces torch's worker handler, which dies of a SIGTERM from anyone else)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        main_pid = multiprocessing.parent_process().pid
        threading.Thread(target=EpochLoader.end_on_sigterm_from, args=(main_pid,),
                         daemon=True).start()

    @staticmethod
    def end_on_sigterm_from(main_pid: int) -> None:
        """Wait for a SIGTERM sent by `main_pid`, then exit quietly as torch's own worker
        handler does (status 0: not reported as a failed worker); ignore those of others."""
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
            pass  # sent to the whole job: the main process stops the run
        os._exit(0)


def make_loader(
    dataset: CropDataset,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    distributed: bool | None = None,
    pin_memory: bool = False,
) -> EpochLoader:
    """Shuffled batches of full size; each process of a distributed run gets its own part.

    distributed=None means "if torch.distributed is initialised". The sampler is always a
    DistributedSampler (one replica when not distributed) so shuffling is seeded by
    (seed, epoch) and `loader.set_epoch(epoch)` works the same everywhere. Workers are not
    persistent, so the dataset's epoch reaches them at the start of every epoch.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(f"{len(dataset)} clips over {replicas} process(es) "
                         f"do not fill one batch of {batch_size}")
    return EpochLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                       drop_last=True, pin_memory=pin_memory,
                       worker_init_fn=EpochLoader.leave_stop_signals_to_main)


def open_or_prepare_store(
    paths: Iterable[str | Path], cache_dir: str | Path = "cache/stores", workers: int = 1
) -> FeatureStore:
    """A single store directory is opened as is; audio folders are prepared (or the
    preparation resumed) into `cache_dir/store_<folders key>_<content key>`.

    The content key is a hash of every regular file's (path, size, mtime_ns) under the
    folders (`content_identity`), so deleting, adding or rewriting a file gives a new
    store instead of training on stale frames; unchanged folders reuse their store.
    Stores of older contents of the same folders are left in place (another run may still
    be reading them); a warning names them so they can be deleted to free space.
    """
    paths = [Path(path) for path in paths]
    if len(paths) == 1 and FeatureStore.is_store(paths[0]):
        return FeatureStore(paths[0])
    folders_key = hashlib.sha1("\n".join(sorted(str(absolute(p)) for p in paths))
                               .encode(errors="surrogateescape")).hexdigest()[:8]
    content_key = content_identity(paths, ignore=cache_dir)[:12]
    out = Path(cache_dir) / f"store_{folders_key}_{content_key}"
    older = sorted(p.name for p in Path(cache_dir).glob(f"store_{folders_key}_*") if p != out)
    if older and not out.exists():
        logger.warning("the audio under %s changed since it was prepared: preparing a new "
                       "store %s; older stores of these folders can be deleted: %s",
                       described(paths), files.shown(out), ", ".join(older))
    summary = prepare(paths, out, workers=workers)
    logger.info("prepare: %s", summary)
    return FeatureStore(out)


def content_identity(inputs: Iterable[str | Path], ignore: str | Path | None = None) -> str:
    """A SHA-1 of the sorted (path, size, mtime_ns) of every regular file under `inputs`,
    and of the entries find_files skips: what a cached store of those inputs depends on.
    Paths under the folder `ignore` (the store cache, should it lie inside the audio
    folders) are left out, or each new store would change the key of the next run."""
    skipped: dict[str, str] = {}
    found = find_files(inputs, skipped=skipped)
    if ignore is not None:
        prefix = str(absolute(ignore)) + os.sep
        found = [path for path in found if not path.startswith(prefix)]
        skipped = {path: why for path, why in skipped.items() if not path.startswith(prefix)}
    rows = []
    for path in found:
        status = stat_problem(path)[0]
        rows.append((path, status.st_size, status.st_mtime_ns) if status else (path, -1, -1))
    rows += sorted(skipped.items())
    text = json.dumps(rows)  # ASCII: surrogate escapes of odd names become \udcXX
    return hashlib.sha1(text.encode()).hexdigest()


# ---------------------------------------------------------------------------
# Demo set: synthetic sounds (NOT real audio)
# ---------------------------------------------------------------------------


def _tone(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A harmonic tone, 100-2000 Hz fundamental, 1/k harmonic amplitudes below Nyquist."""
    f0 = 100 * 2 ** rng.uniform(0, math.log2(20))
    harmonics = np.arange(1, int(SAMPLE_RATE / 2 / f0) + 1)[: rng.integers(1, 9)]
    return sum(np.sin(2 * np.pi * k * f0 * t) / k for k in harmonics)


def _chirp(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """An exponential sweep between two random frequencies in 100-6000 Hz."""
    f0, f1 = 100 * 60 ** rng.uniform(0, 1, size=2)
    duration = t[-1] + 1 / SAMPLE_RATE
    rate = math.log(f1 / f0) / duration
    return np.sin(2 * np.pi * f0 * np.expm1(rate * t) / rate)


def _noise_burst(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Band-limited white noise with an exponential decay."""
    spectrum = np.fft.rfft(rng.standard_normal(len(t)))
    freqs = np.fft.rfftfreq(len(t), 1 / SAMPLE_RATE)
    low = rng.uniform(50, 4000)
    spectrum[(freqs < low) | (freqs > low * rng.uniform(1.5, 4))] = 0
    noise = np.fft.irfft(spectrum, len(t))
    return noise / (np.abs(noise).max() + 1e-9) * np.exp(-t * rng.uniform(1, 10))


def _clicks(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A train of short resonant clicks: 2-30 clicks/s, resonance 300-5000 Hz."""
    rate, pitch = rng.uniform(2, 30), rng.uniform(300, 5000)
    since_click = np.mod(t, 1 / rate)
    return np.sin(2 * np.pi * pitch * since_click) * np.exp(-since_click * 200)


DEMO_SOUNDS = (_tone, _chirp, _noise_burst, _clicks)


def synthetic_clip(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """One DEMO clip: 1-3 random sound events over a quiet noise floor, float32 (samples,)."""
    samples = int(seconds * SAMPLE_RATE)
    clip = 0.002 * rng.standard_normal(samples)
    for _ in range(rng.integers(1, 4)):
        length = int(rng.uniform(0.2, 1.0) * samples)
        start = rng.integers(0, samples - length + 1)
        t = np.arange(length) / SAMPLE_RATE
        sound = DEMO_SOUNDS[rng.integers(len(DEMO_SOUNDS))](rng, t)
        fade = np.minimum(1, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fades against clicks
        clip[start: start + length] += rng.uniform(0.1, 0.5) * sound * fade
    return (0.9 * clip / np.abs(clip).max()).astype(np.float32)


def synthetic_audio(n_clips: int = 256, seconds: float = 4.0, seed: int = 0) -> list[np.ndarray]:
    """The DEMO set: `n_clips` synthetic 16 kHz clips of tones, chirps, noise bursts and
    click trains at various pitches and rates. Not real audio: for smoke tests and for
    trying the training loop without a dataset."""
    rng = np.random.default_rng(seed)
    return [synthetic_clip(rng, seconds) for _ in range(n_clips)]


def prepare_demo(
    out: str | Path = "cache/demo_store",
    n_clips: int = 256,
    seconds: float = 4.0,
    seed: int = 0,
    workers: int = 1,
) -> FeatureStore:
    """Build (or reopen) the DEMO store: synthetic_audio() written as WAV files under
    `out/demo_audio/`, then prepared into `out`. A demo, not a pretraining dataset."""
    out = Path(out)
    logger.warning("Using the built-in DEMO set (%d synthetic clips of %.1f s) in %s: "
                   "not real audio.", n_clips, seconds, out)
    audio_dir = out / "demo_audio"
    if len(list(audio_dir.glob("demo_*.wav"))) < n_clips:  # new, or interrupted while writing
        for number, clip in enumerate(synthetic_audio(n_clips, seconds, seed)):
            write_wav(audio_dir / f"demo_{number:05d}.wav", clip)
    summary = prepare([audio_dir], out, workers=workers, progress=False)
    logger.info("prepare: %s", summary)
    return FeatureStore(out)


def write_wav(path: Path, clip: np.ndarray) -> None:
    """A 16-bit 16 kHz WAV, atomically (an interrupted run never leaves half a file)."""
    files.atomic_write(path, lambda tmp: sf.write(tmp, clip, SAMPLE_RATE, subtype="PCM_16",
                                                  format="WAV"))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def measure_crops_per_second(dataset: CropDataset, batch_size: int, workers: int,
                             batches: int) -> float:
    """Crops per second delivered by make_loader(dataset, ...) over `batches` batches
    (after one warm-up batch, so worker start-up is not counted)."""
    loader = make_loader(dataset, batch_size, workers=workers)
    epochs = math.ceil((batches + 1) / len(loader))
    batch_stream = (batch for epoch in range(epochs) for batch in loader)
    next(batch_stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(batch_stream)
    return batches * batch_size / (time.perf_counter() - start)


@click.group()
def cli() -> None:
    """Prepare log-mel feature stores for pretraining."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors a user can cause (bad paths, empty folders, foreign stores) into
    click's one-line "Error: ..." and a non-zero exit, without a traceback."""
    try:
        yield
    except (ValueError, OSError, AudioError) as error:
        raise click.ClickException(str(error)) from None


@cli.command("prepare")
@click.argument("audio_dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Store directory (created, or resumed if it holds a store).")
@click.option("--workers", type=click.IntRange(min=0), default=max(1, (os.cpu_count() or 1) - 1),
              show_default=True, help="Processes computing log-mels (0 or 1: in this process).")
@click.option("--shard-mb", type=click.IntRange(min=1), default=SHARD_BYTES // 2**20,
              show_default=True, help="Size in MiB at which a new shard file is started.")
def prepare_command(audio_dirs: tuple[str, ...], out: str, workers: int, shard_mb: int) -> None:
    """Compute the log-mel of every file under AUDIO_DIRS into the store OUT (resumable)."""
    with one_line_errors():
        summary = prepare(audio_dirs, out, workers=workers, shard_bytes=shard_mb * 2**20)
    click.echo(f"prepare: {summary}")


@cli.command("demo")
@click.option("--out", default="cache/demo_store", show_default=True,
              type=click.Path(file_okay=False), help="Store directory (the WAVs go to OUT/demo_audio).")
@click.option("--clips", type=click.IntRange(min=1), default=256, show_default=True,
              help="Number of synthetic clips.")
@click.option("--seconds", type=click.FloatRange(min=0.5), default=4.0, show_default=True,
              help="Length of each clip in seconds.")
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic sounds.")
def demo_command(out: str, clips: int, seconds: float, seed: int) -> None:
    """Build the DEMO store of synthetic sounds (not real audio)."""
    with one_line_errors():
        store = prepare_demo(out, clips, seconds, seed)
    click.echo(f"demo: DEMO store of {counted(len(store), 'synthetic clip')} in "
               f"{files.shown(out)} (not real audio)")


@cli.command("speed")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Crops per batch.")
@click.option("--workers", "worker_counts", multiple=True, type=click.IntRange(min=0),
              default=(0, 2), show_default=True,
              help="DataLoader workers to measure (repeat the option for several).")
@click.option("--batches", type=click.IntRange(min=1), default=50, show_default=True,
              help="Batches timed per worker count (after one warm-up batch).")
def speed_command(store: str, batch_size: int, worker_counts: tuple[int, ...],
                  batches: int) -> None:
    """Measure random crops per second from STORE through the DataLoader."""
    with one_line_errors():
        dataset = CropDataset(FeatureStore(store))
        for workers in worker_counts:
            rate = measure_crops_per_second(dataset, batch_size, workers, batches)
            click.echo(f"speed: {rate:,.0f} crops/s with {counted(workers, 'worker')} "
                       f"(batch {batch_size})")


if __name__ == "__main__":
    cli()
