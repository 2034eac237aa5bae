"""Pretraining data for several hosts: webdataset tar shards of prepared log-mel clips.

A feature store (data.py) is memory-mapped local files: right for one machine. A job on several
hosts or a TPU pod instead streams tar shards from a shared filesystem, HTTP(S) or object
storage (webdataset's URLs: local paths, `pipe:COMMAND`, `gs://`), so that no host first copies
the whole store. The training arithmetic does not change: crops and masks are functions of
(seed, epoch, clip) wherever a clip is read, and a resumed run continues exactly.

Public API
----------
    write_shards(store, out, shard_bytes=128 MiB, progress=True) -> dict
        The clips of a FeatureStore as tar shards OUT/000000.tar ... plus OUT/shards.json.
    open_shard_set(sources) -> ShardSet
        A shard folder, or URLs / brace patterns; the index is read beside the first shard.
    assign_shards(num_shards, seed, epoch, world, workers) -> [rank][worker] -> shard numbers
    make_shard_loader(shard_set, batch_size, workers=0, seed=0, crop_frames=200,
                      distributed=None, pin_memory=False) -> ShardLoader
        Batches (crops (B, T, 80), clip indices (B,)), like data.make_loader's.
webdataset is needed only to read shards (pip install webdataset); writing needs nothing more.

Shard format
------------
NNNNNN.tar   one record per clip, key = the clip's global index (9 digits): KEY.mel.npy, the
             float16 (frames, 80) log-mel as stored (not normalised), and KEY.json,
             {"clip", "path", "frames", "mean", "std"} (whole-clip statistics, as in the store).
             Clips are in store order, so shard k holds clips [first_clip, first_clip + clips).
shards.json  {"format", "frontend" (data.STORE_FORMAT), "clips", "frames", "hours",
             "shards": [{"name", "clips", "frames", "first_clip"}]}: a run knows its epoch
             length without reading a shard. Written last; every file is written atomically.
Where the index of URLs is: beside the shards, its URL being the first shard's URL with the
shard's file name replaced by shards.json (`pipe:gcloud storage cat gs://b/s/000000.tar` ->
`pipe:gcloud storage cat gs://b/s/shards.json`).

Epoch order (all pure functions of the arguments named)
-------------------------------------------------------
Readers are (rank, DataLoader worker) pairs, R = world size x max(1, workers). In epoch e the
shards are permuted by (seed, e) and dealt round-robin to the R readers; only whole rounds are
dealt, so every reader gets N // R shards and the N % R left over (different ones every epoch)
wait for a later epoch. A reader reads its shards in order, each shuffled by (seed, e, shard),
and yields exactly `batches_per_reader` batches: as many whole batches as the N // R smallest
shards of the index hold, so the same count in every epoch and every reader (DDP needs every
process to take the same number of steps); the few clips over it are dropped for that epoch.
A process's DataLoader takes one batch from each of its workers in turn. Memory: each reader
holds one shard (about --shard-mb, twice while decoding) to shuffle it.
Same for any world size: which clips exist, each clip's crop and mask noise, each shard's
in-shard order. Not the same when world size x workers changes: which clips share a batch,
the batch order, which shards wait for the next epoch, and the epoch length. So --resume needs
the same processes and workers (train.py checks `shard_readers`).

Resume: to start at batch b of an epoch, each worker skips b // workers whole batches, skipping
whole shards by their index counts without opening them; the last b % workers batches are read
and dropped. An unreadable or truncated shard is reported (one line with the running count) and
skipped; a reader that runs short repeats its readable shards (a new shuffle) to fill its
batches, so every process still does the same number of steps. Resume is exact when no shard
before the checkpoint in the resumed epoch was unreadable (the skip counts the index's clips).
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import multiprocessing
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from tqdm import tqdm

import audio
import data
import files

logger = logging.getLogger(__name__)

FORMAT = "mwmae-logmel-shards-v1"
INDEX_NAME = "shards.json"
SHARD_BYTES = 128 * 2**20
SHARD_STREAM = 0x7368617264  # keeps the shard order apart from the crop and mask randomness
MISSING_WEBDATASET = "reading tar shards needs webdataset: pip install webdataset"


def require_webdataset():
    """The webdataset module, or an ImportError with a one-line remedy."""
    try:
        import webdataset
    except ImportError:
        raise ImportError(MISSING_WEBDATASET) from None
    return webdataset


# ----------------------------------------------------------------------------- writing

def shard_file_name(number: int) -> str:
    return f"{number:06d}.tar"


def shard_groups(frames: np.ndarray, shard_bytes: int) -> list[range]:
    """Consecutive clips per shard: a new shard starts when the next clip would pass
    `shard_bytes` of log-mel (a clip longer than that gets a shard of its own)."""
    groups, first, size = [], 0, 0
    for clip, clip_frames in enumerate(frames):
        clip_bytes = int(clip_frames) * data.FRAME_BYTES
        if clip > first and size + clip_bytes > shard_bytes:
            groups.append(range(first, clip))
            first, size = clip, 0
        size += clip_bytes
    return groups + [range(first, len(frames))] if len(frames) else groups


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """A regular file with fixed metadata, so the same clips give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_tar(path: str, store: data.FeatureStore, paths: list[str], clips: range) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for clip in clips:
            key = f"{clip:09d}"
            log_mel = io.BytesIO()
            np.save(log_mel, np.asarray(store.log_mel(clip), dtype="<f2"), allow_pickle=False)
            add_member(tar, f"{key}.mel.npy", log_mel.getvalue())
            meta = dict(clip=clip, path=paths[clip], frames=int(store.frames[clip]),
                        mean=float(store.means[clip]), std=float(store.stds[clip]))
            add_member(tar, f"{key}.json", json.dumps(meta).encode())


def own_files(out: str | Path) -> list[str]:
    """The names write_shards writes in `out` (for files.OutputFolder's --overwrite)."""
    shards = sorted(path.name for path in Path(out).glob("[0-9]*.tar"))
    return [INDEX_NAME, *shards]


def write_shards(store: data.FeatureStore, out: str | Path, shard_bytes: int = SHARD_BYTES,
                 progress: bool = True) -> dict:
    """Write every clip of `store` into tar shards of about `shard_bytes` in `out`, then the
    index; return the index. Each file is written atomically, the index last."""
    out = Path(out)
    paths = [entry["path"] for entry in data.read_index(store.root)]
    entries = []
    with tqdm(total=len(store), desc="shards", unit="clip", disable=not progress) as bar:
        for number, clips in enumerate(shard_groups(store.frames, shard_bytes)):
            name = shard_file_name(number)
            files.atomic_write(out / name, lambda tmp: write_tar(tmp, store, paths, clips))
            entries.append(dict(name=name, clips=len(clips),
                                frames=int(store.frames[clips.start:clips.stop].sum()),
                                first_clip=clips.start))
            bar.update(len(clips))
    frames = int(store.frames.sum())
    index = dict(format=FORMAT, frontend=data.STORE_FORMAT, clips=len(store), frames=frames,
                 hours=frames * audio.HOP / audio.SAMPLE_RATE / 3600, shards=entries)
    files.write_json(out / INDEX_NAME, index)
    return index


# ----------------------------------------------------------------------------- shard sets

@dataclass
class ShardSet:
    """The shards a run reads: URLs and, from the index, clips and first clip of each."""

    urls: list[str]
    clips: list[int]
    first_clips: list[int]

    def __len__(self) -> int:
        return len(self.urls)


def is_shard_url(value: str) -> bool:
    """A webdataset URL or pattern rather than a local folder: `pipe:...`, `scheme://...`, or
    a name ending in `.tar` (`/data/shards/{000000..000999}.tar`)."""
    return (value.startswith("pipe:") or value.endswith(".tar")
            or re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value) is not None)


def is_shard_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX_NAME).is_file()


def is_shard_source(sources: tuple[str, ...] | list[str]) -> bool:
    return any(is_shard_url(source) or is_shard_folder(source) for source in sources)


def shard_name(url: str) -> str:
    """The file name of the shard in a URL: its last `NAME.tar`."""
    names = re.findall(r"[^/\s:]+\.tar\b", url)
    if not names:
        raise ValueError(f"{url}: no shard file name (NAME.tar) in this URL")
    return names[-1]


def index_url(shard_url: str) -> str:
    """The index beside a shard: the shard's URL with its file name replaced by shards.json."""
    name = shard_name(shard_url)
    head, _, tail = shard_url.rpartition(name)
    return head + INDEX_NAME + tail


def read_url(url: str) -> bytes:
    """All bytes of a local path or webdataset URL; a failed `pipe:` command raises OSError."""
    stream = require_webdataset().gopen(url)
    try:
        return stream.read()
    finally:
        stream.close()


def check_index(index: dict, where: str) -> None:
    if index.get("format") != FORMAT or index.get("frontend") != data.STORE_FORMAT:
        raise ValueError(f"{where} is not an index of {FORMAT} shards with this frontend "
                         f"(format {index.get('format')!r})")


def open_shard_set(sources: list[str] | tuple[str, ...]) -> ShardSet:
    """The shards of a folder written by write_shards, or of URLs and brace patterns (in the
    given order); their clip counts come from the index. Raises ValueError (unknown shard,
    foreign index, repeated shard), OSError (index not readable), ImportError (no webdataset)."""
    wds = require_webdataset()
    if len(sources) == 1 and is_shard_folder(sources[0]):
        where = Path(sources[0]) / INDEX_NAME
        index = json.loads(files.read_text(where))
        check_index(index, files.shown(where))
        entries = index["shards"]
        urls = [str(Path(sources[0]) / entry["name"]) for entry in entries]
    else:
        urls = [url for source in sources for url in wds.shardlists.expand_urls(source)]
        where = index_url(urls[0])
        try:
            index = json.loads(read_url(where).decode("utf-8", errors="surrogateescape"))
        except (OSError, ValueError) as error:
            raise OSError(f"cannot read the shard index {where}: {error}") from None
        check_index(index, where)
        by_name = {entry["name"]: entry for entry in index["shards"]}
        unknown = [url for url in urls if shard_name(url) not in by_name]
        if unknown:
            raise ValueError(f"{unknown[0]}: not a shard of the index {where}")
        entries = [by_name[shard_name(url)] for url in urls]
    if len({entry["name"] for entry in entries}) < len(entries):
        raise ValueError("a shard is given more than once: its clips would be seen twice per epoch")
    return ShardSet(urls, [entry["clips"] for entry in entries],
                    [entry["first_clip"] for entry in entries])


# ----------------------------------------------------------------------------- epoch plan

def assign_shards(num_shards: int, seed: int, epoch: int, world: int,
                  workers: int) -> list[list[list[int]]]:
    """[rank][worker] -> the shard numbers that reader reads in `epoch`, in reading order.

    Shards permuted by (seed, epoch), dealt round-robin to reader rank * workers + worker,
    whole rounds only (num_shards // readers each; the rest wait for another epoch)."""
    readers = world * workers
    if num_shards < readers:
        raise ValueError(f"{num_shards} shards for {world} process(es) x {workers} reader(s): "
                         "every reader needs a shard of its own; write smaller shards "
                         "(--shard-mb) or use fewer workers")
    order = np.random.default_rng([SHARD_STREAM, seed, epoch]).permutation(num_shards)
    dealt = order[: num_shards // readers * readers]
    return [[dealt[rank * workers + worker:: readers].tolist() for worker in range(workers)]
            for rank in range(world)]


def batches_per_reader(clips: list[int], readers: int, batch_size: int) -> int:
    """Batches every reader yields in every epoch: the clips of its shards in the worst case
    (the num_shards // readers smallest), in whole batches."""
    return sum(sorted(clips)[: len(clips) // readers]) // batch_size


# ----------------------------------------------------------------------------- reading

class ShardClip(NamedTuple):
    clip: int
    log_mel: np.ndarray  # float16 (frames, 80)
    mean: np.float32
    std: np.float32


def read_shard(url: str, expected_clips: int) -> list[ShardClip]:
    """The clips of one shard in tar order. Raises on anything wrong: unreadable, not a tar,
    truncated (fewer clips than the index says), a record without both parts or with a bad
    array (arrays are read with allow_pickle=False: a shard cannot run code)."""
    wds = require_webdataset()
    records: dict[str, dict[str, bytes]] = {}
    stream = wds.gopen(url)
    try:
        for member in wds.tariterators.tar_file_iterator(stream):
            key, _, suffix = member["fname"].partition(".")
            records.setdefault(key, {})[suffix] = member["data"]
    finally:
        stream.close()
    if len(records) != expected_clips:
        raise ValueError(f"truncated: {len(records)} of {expected_clips} clips")
    clips = []
    for key, parts in records.items():
        meta = json.loads(parts["json"])
        log_mel = np.load(io.BytesIO(parts["mel.npy"]), allow_pickle=False)
        if log_mel.dtype != np.float16 or log_mel.shape != (meta["frames"], audio.N_MELS):
            raise ValueError(f"record {key}: log-mel {log_mel.dtype} {log_mel.shape}")
        clips.append(ShardClip(int(meta["clip"]), log_mel, np.float32(meta["mean"]),
                               np.float32(meta["std"])))
    return clips


def first_line(error: BaseException) -> str:
    """'Type: first line of the message', without the stream webdataset appends (' @ <...>')."""
    text = (str(error).strip().splitlines() or [""])[0].split(" @ <")[0]
    return f"{type(error).__name__}: {text}"


class ShardCrops(IterableDataset):
    """The crops (float32 (crop_frames, 80), clip index) one process reads in an epoch: those
    of the shards assign_shards gives its DataLoader workers (see the module docstring).
    Crops are data.normalized_crop at data.crop_start(seed, epoch, clip): the store's crops."""

    def __init__(self, shards: ShardSet, batch_size: int, crop_frames: int = 200, seed: int = 0,
                 rank: int = 0, world: int = 1, workers: int = 1):
        self.shards, self.batch_size, self.crop_frames, self.seed = shards, batch_size, crop_frames, seed
        self.rank, self.world, self.workers = rank, world, workers
        assign_shards(len(shards), seed, 0, world, workers)  # enough shards?
        self.batches_per_reader = batches_per_reader(shards.clips, world * workers, batch_size)
        if self.batches_per_reader == 0:
            raise ValueError(f"{len(shards)} shards of {sum(shards.clips)} clips over "
                             f"{world} process(es) x {workers} reader(s) do not give every "
                             f"reader one batch of {batch_size}")
        self.epoch = self.skip_batches = 0
        self.unreadable = multiprocessing.Value("i", 0)  # shared with the DataLoader workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip_batches = epoch, 0

    def __len__(self) -> int:
        return sum(self.shards.clips)  # the data set's clips, as len() of a CropDataset

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shards = assign_shards(len(self.shards), self.seed, self.epoch, self.world,
                               self.workers)[self.rank][worker]
        skip = self.skip_batches * self.batch_size
        clips = self.reader_clips(shards, skip)
        for clip in itertools.islice(clips, self.batches_per_reader * self.batch_size - skip):
            yield self.crop(clip)

    def reader_clips(self, shards: list[int], skip: int) -> Iterator[ShardClip]:
        """The clips of `shards` in order, each shard shuffled, from position `skip` (whole
        shards before it are not opened: skipped by their index counts). When they run out
        (unreadable shards were skipped), the readable ones again, shuffled anew."""
        for repeat in itertools.count():
            readable = []
            for shard in shards:
                if skip >= self.shards.clips[shard]:
                    skip -= self.shards.clips[shard]
                    readable.append(shard)
                    continue
                clips = self.shuffled(shard, repeat)
                readable += [shard] if clips else []
                yield from clips[skip:]
                skip = 0
            if not readable:
                raise OSError(f"none of the shards {shards} of this reader is readable")
            shards = readable

    def shuffled(self, shard: int, repeat: int = 0) -> list[ShardClip]:
        """The clips of a shard in the order of (seed, epoch, shard, repeat); none (reported
        and counted) when it cannot be read."""
        url = self.shards.urls[shard]
        try:
            clips = read_shard(url, self.shards.clips[shard])
        except Exception as error:  # noqa: BLE001 - one bad shard must not stop a long run
            with self.unreadable.get_lock():
                self.unreadable.value += 1
                count = self.unreadable.value
            # ERROR: train.py shows only errors from ranks other than 0
            logger.error("skipped unreadable shard %s (%s); %s so far in this process",
                         url, first_line(error), data.counted(count, "unreadable shard"))
            return []
        key = [SHARD_STREAM, self.seed, self.epoch, self.shards.first_clips[shard], repeat]
        return [clips[i] for i in np.random.default_rng(key).permutation(len(clips))]

    def crop(self, clip: ShardClip) -> tuple[torch.Tensor, int]:
        start = data.crop_start(len(clip.log_mel), self.crop_frames, self.seed, self.epoch, clip.clip)
        frames = clip.log_mel[start: start + self.crop_frames]
        return data.normalized_crop(frames, clip.mean, clip.std, self.crop_frames), clip.clip

    def example(self) -> tuple[torch.Tensor, int]:
        """(crop, clip) shown in train.py's figures: the first clip of the first readable shard."""
        for shard in range(len(self.shards)):
            clips = self.shuffled(shard)
            if clips:
                return self.crop(min(clips, key=lambda clip: clip.clip))
        raise OSError("no shard is readable")


class ShardLoader(data.EpochLoader):
    """data.EpochLoader over ShardCrops: the same worker signal handling, `set_epoch`, and
    `epoch_batches` that skips consumed batches without reading them where it can."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.dataset.batches_per_reader * self.dataset.workers

    def epoch_batches(self, epoch: int, start: int, stop: int) -> Iterator:
        """Batches [start, stop) of `epoch`. The loader takes batch j of worker w as its batch
        j * workers + w, so each worker skips start // workers batches itself and the
        remaining start % workers are read here and dropped."""
        self.set_epoch(epoch)
        rounds = start // self.dataset.workers
        self.dataset.skip_batches = rounds
        done = rounds * self.dataset.workers
        return itertools.islice(self, start - done, stop - done)


def make_shard_loader(shards: ShardSet, batch_size: int, workers: int = 0, seed: int = 0,
                      crop_frames: int = 200, distributed: bool | None = None,
                      pin_memory: bool = False) -> ShardLoader:
    """Batches of this process's shards (see ShardCrops); distributed=None means "if
    torch.distributed is initialised". ValueError when there are too few shards or clips."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    dataset = ShardCrops(shards, batch_size, crop_frames, seed, rank, world, max(1, workers))
    return ShardLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
                       pin_memory=pin_memory,
                       worker_init_fn=data.EpochLoader.leave_stop_signals_to_main)
