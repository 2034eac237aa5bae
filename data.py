"""Pretraining data: the log-mel feature store, random crops, the demo set.

The frontend itself (finding and reading audio files, log-mel, normalisation) is audio.py;
this module computes it once per file into a store and serves normalised crops of it to the
training loop.

Public API
----------
Feature store (log-mel computed once, read many times during pretraining)
    prepare(inputs, out, workers=1, shard_bytes=256 MiB, progress=True) -> PrepareSummary
        Walk audio folders, write/extend the store `out` (resumable); ValueError when they
        hold no readable audio.
    FeatureStore(root)
        Read access: len(store), store.frames/means/stds, store.log_mel(i, start, stop).
    open_or_prepare_store(paths, cache_dir="cache/stores", workers=1) -> FeatureStore
        A store directory as is, or audio folders prepared into a store cached by content
        (file names, sizes and mtimes).
    prepare_demo(out="cache/demo_store", n_clips=256, seconds=4.0, seed=0, workers=1)
        -> FeatureStore
        The built-in DEMO store of synthetic sounds (smoke tests, `python train.py` without data).
    synthetic_audio(n_clips, seconds, seed) -> list[np.ndarray]
        The demo set's waveforms.
    read_index(root), read_bad_files(root)
        A store's clips (list of dicts) and rejected files ({path: reason}).
Pretraining data
    CropDataset(store, crop_frames=200, seed=0)
        Item i -> (crop, i): a reproducible random normalised crop (200, 80) of clip i and the
        clip's index (batched: crops (B, 200, 80), indices (B,)); set_epoch(epoch).
    make_loader(dataset, batch_size, workers=0, seed=0, distributed=None, pin_memory=False)
        -> EpochLoader
        Shuffled DataLoader (DistributedSampler, drop_last); call loader.set_epoch(epoch),
        or take loader.epoch_batches(epoch, start, stop) (what train.py does).
        Its workers leave SIGINT/SIGTERM to the main process (see EpochLoader).
    crop_start(frames, crop_frames, seed, epoch, clip), normalized_crop(frames, mean, std,
        crop_frames): the crop of a clip, shared with shards.py's tar shards.
    measure_crops_per_second(dataset, batch_size, workers, batches) -> float
    loader_crops_per_second(loader, batches) -> float

Command line: `python data.py prepare AUDIO_DIR... --out STORE [--workers N] [--shard-mb MB]`,
`python data.py demo [--out STORE]`, `python data.py shards STORE_OR_AUDIO_DIRS... --out DIR`
(webdataset tar shards for several hosts, see shards.py), `python data.py speed STORE
[--shards SHARDS] [--workers N]...` (crops per second); errors a user can cause end with one
line and a non-zero exit.

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
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import click
import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import audio
import files

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Feature store: writing
# ---------------------------------------------------------------------------

STORE_FORMAT = {
    "format": "mwmae-logmel-store-v1",
    "sample_rate": audio.SAMPLE_RATE,
    "n_fft": audio.N_FFT,
    "hop": audio.HOP,
    "n_mels": audio.N_MELS,
    "f_min": audio.F_MIN,
    "f_max": audio.F_MAX,
    "dtype": "float16",
}
FRAME_BYTES = audio.N_MELS * np.dtype(np.float16).itemsize  # one stored frame: 80 float16
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


def extract_features(path: str) -> ClipFeatures:
    """Load one file and compute its log-mel; never raises, bad files come back with `error`."""
    try:
        samples = audio.load_audio(path)  # (samples,)
        if np.abs(samples).max() < SILENCE_PEAK:
            raise audio.AudioError(path, f"silent (peak below {SILENCE_PEAK:g})")
        with torch.no_grad():
            log_mel = audio.LogMel()(torch.from_numpy(samples))  # (frames, 80) float32
        audio.check_finite(log_mel, path)
    except audio.AudioError as error:
        return ClipFeatures(path, None, error=error.reason)
    except Exception as error:  # noqa: BLE001 - one odd file must not stop a long run
        return ClipFeatures(path, None, error=f"unexpected {type(error).__name__}: {error}")
    std, mean = torch.std_mean(log_mel, correction=0)  # population std, as in `audio.normalize`
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
    paths = audio.find_files(inputs, exclude=out, skipped=skipped)
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
    return PrepareSummary(added, frames * audio.HOP / audio.SAMPLE_RATE / 3600, resumed, bad, total, str(out))


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
            mapped = mapped.reshape(-1, audio.N_MELS)
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


def crop_start(frames: int, crop_frames: int, seed: int, epoch: int, clip: int) -> int:
    """The first frame of the crop of a clip of `frames` frames: a function of (seed, epoch,
    clip) only, so every reader of the clip (store or shards, any process) cuts the same crop."""
    spare = max(frames - crop_frames, 0)
    return int(np.random.default_rng([seed, epoch, clip]).integers(0, spare + 1))


def normalized_crop(frames: np.ndarray, mean: np.float32, std: np.float32,
                    crop_frames: int) -> torch.Tensor:
    """float16 (<=crop_frames, 80) log-mel frames -> float32 (crop_frames, 80) standardised with
    the whole clip's statistics, zero-padded at the end (the clip's mean level). mean and std
    are float32 scalars, as the store holds them (a Python float would make numpy subtract in
    float16), so every caller gets the same bits."""
    crop = np.zeros((crop_frames, audio.N_MELS), dtype=np.float32)  # the zeros are the padding
    valid = crop[: len(frames)]
    np.subtract(frames, mean, out=valid)
    valid *= 1 / (std + audio.NORM_EPS)
    return torch.from_numpy(crop)


class CropDataset(Dataset):
    """Item i -> (a random `crop_frames` crop of clip i normalised with whole-clip statistics, i).

    Returns (float32 (crop_frames, 80) = (log_mel - clip mean) / (clip std + 1e-8), i): the
    index travels with the crop, so whoever batches crops (train.py's mask noise is a function
    of the clip) knows which clips a batch holds without reading the sampler again.
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
        return crop_start(int(self.store.frames[index]), self.crop_frames, self.seed, self.epoch,
                          index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        start = self.crop_start(index)
        frames = self.store.log_mel(index, start, start + self.crop_frames)  # (<=crop, 80) f16
        crop = normalized_crop(frames, self.store.means[index], self.store.stds[index],
                               self.crop_frames)
        return crop, index  # (crop_frames, 80), clip index

    def example(self) -> tuple[torch.Tensor, int]:
        """(crop, clip) of the clip shown in train.py's figures: clip 0, current epoch."""
        return self[0]


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

    def epoch_batches(self, epoch: int, start: int, stop: int) -> Iterator:
        """Batches [start, stop) of `epoch` (a resumed epoch starts at `start`; the batches
        before it are read and dropped, so the ones after it are those of the straight run)."""
        self.set_epoch(epoch)
        return itertools.islice(self, start, stop)

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
    folders_key = hashlib.sha1("\n".join(sorted(str(audio.absolute(p)) for p in paths))
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
    found = audio.find_files(inputs, skipped=skipped)
    if ignore is not None:
        prefix = str(audio.absolute(ignore)) + os.sep
        found = [path for path in found if not path.startswith(prefix)]
        skipped = {path: why for path, why in skipped.items() if not path.startswith(prefix)}
    rows = []
    for path in found:
        status = audio.stat_problem(path)[0]
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
    harmonics = np.arange(1, int(audio.SAMPLE_RATE / 2 / f0) + 1)[: rng.integers(1, 9)]
    return sum(np.sin(2 * np.pi * k * f0 * t) / k for k in harmonics)


def _chirp(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """An exponential sweep between two random frequencies in 100-6000 Hz."""
    f0, f1 = 100 * 60 ** rng.uniform(0, 1, size=2)
    duration = t[-1] + 1 / audio.SAMPLE_RATE
    rate = math.log(f1 / f0) / duration
    return np.sin(2 * np.pi * f0 * np.expm1(rate * t) / rate)


def _noise_burst(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Band-limited white noise with an exponential decay."""
    spectrum = np.fft.rfft(rng.standard_normal(len(t)))
    freqs = np.fft.rfftfreq(len(t), 1 / audio.SAMPLE_RATE)
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
    samples = int(seconds * audio.SAMPLE_RATE)
    clip = 0.002 * rng.standard_normal(samples)
    for _ in range(rng.integers(1, 4)):
        length = int(rng.uniform(0.2, 1.0) * samples)
        start = rng.integers(0, samples - length + 1)
        t = np.arange(length) / audio.SAMPLE_RATE
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
    files.atomic_write(path, lambda tmp: sf.write(tmp, clip, audio.SAMPLE_RATE, subtype="PCM_16",
                                                  format="WAV"))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def measure_crops_per_second(dataset: CropDataset, batch_size: int, workers: int,
                             batches: int) -> float:
    """Crops per second delivered by make_loader(dataset, ...) over `batches` batches
    (after one warm-up batch, so worker start-up is not counted)."""
    return loader_crops_per_second(make_loader(dataset, batch_size, workers=workers), batches)


def loader_crops_per_second(loader: EpochLoader, batches: int) -> float:
    """Crops per second delivered by any EpochLoader (store or shards) over `batches` batches,
    after one warm-up batch."""
    epochs = math.ceil((batches + 1) / len(loader))
    batch_stream = (batch for epoch in range(epochs)
                    for batch in loader.epoch_batches(epoch, 0, len(loader)))
    next(batch_stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(batch_stream)
    return batches * loader.batch_size / (time.perf_counter() - start)


@click.group()
def main() -> None:
    """Prepare log-mel feature stores for pretraining."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors a user can cause (bad paths, empty folders, foreign stores) into
    click's one-line "Error: ..." and a non-zero exit, without a traceback."""
    try:
        yield
    except (ValueError, OSError, ImportError, audio.AudioError) as error:
        raise click.ClickException(str(error)) from None


@main.command("prepare")
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


@main.command("demo")
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


@main.command("shards")
@click.argument("inputs", metavar="STORE_OR_AUDIO_DIRS...", nargs=-1, required=True,
                type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the shards and their index shards.json (new or empty).")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True), default=128,
              show_default=True, help="Size in MiB at which a new shard is started.")
@click.option("--workers", type=click.IntRange(min=0), default=max(1, (os.cpu_count() or 1) - 1),
              show_default=True, help="Processes computing log-mels when audio folders are given.")
@click.option("--cache-dir", default="cache/stores", show_default=True,
              type=click.Path(file_okay=False), help="Where audio folders are prepared into a store.")
@click.option("--overwrite", is_flag=True, help="Replace the shards and index already in --out.")
def shards_command(inputs: tuple[str, ...], out: str, shard_mb: float, workers: int,
                   cache_dir: str, overwrite: bool) -> None:
    """Write the clips of a store (or of audio folders, prepared into a store first) as
    webdataset tar shards for multi-host pretraining (see shards.py)."""
    import shards  # the command reaches shards.py, a library built on this module's
    with one_line_errors():
        store = open_or_prepare_store(inputs, cache_dir, workers)
        try:
            with files.OutputFolder(out, own=shards.own_files(out), overwrite=overwrite):
                index = shards.write_shards(store, out, int(shard_mb * 2**20))
        except files.OutputError as error:
            raise click.ClickException(str(error)) from None
    click.echo(f"shards: {counted(len(index['shards']), 'shard')} of "
               f"{counted(index['clips'], 'clip')} ({index['hours']:.2f} h) in "
               f"{files.shown(out)}, index {files.shown(Path(out) / shards.INDEX_NAME)}")


@main.command("speed")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Crops per batch.")
@click.option("--workers", "worker_counts", multiple=True, type=click.IntRange(min=0),
              default=(0, 2), show_default=True,
              help="DataLoader workers to measure (repeat the option for several).")
@click.option("--batches", type=click.IntRange(min=1), default=50, show_default=True,
              help="Batches timed per worker count (after one warm-up batch).")
@click.option("--shards", "shard_source", metavar="SHARDS",
              help="Also measure these shards (a folder from `data.py shards`, or a URL or "
                   "brace pattern) with the same settings.")
def speed_command(store: str, batch_size: int, worker_counts: tuple[int, ...],
                  batches: int, shard_source: str | None) -> None:
    """Measure random crops per second from STORE (and from --shards) through the DataLoader."""
    with one_line_errors():
        dataset = CropDataset(FeatureStore(store))
        for workers in worker_counts:
            rate = measure_crops_per_second(dataset, batch_size, workers, batches)
            click.echo(f"speed: store {rate:,.0f} crops/s with {counted(workers, 'worker')} "
                       f"(batch {batch_size})")
        if shard_source:
            import shards  # the command reaches shards.py, a library built on this module's
            shard_set = shards.open_shard_set([shard_source])
            for workers in worker_counts:
                loader = shards.make_shard_loader(shard_set, batch_size, workers, distributed=False)
                rate = loader_crops_per_second(loader, batches)
                click.echo(f"speed: shards {rate:,.0f} crops/s with "
                           f"{counted(workers, 'worker')} (batch {batch_size})")


if __name__ == "__main__":
    main()
