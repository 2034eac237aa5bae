"""Frozen-encoder embeddings in the HEAR API, and a command line to embed audio folders.

HEAR API (module level, so `embed` is a HEAR module as it is)
------------------------------------------------------------
    load_model(model_file_path=None, layout="time", seed=0, batch_size=32) -> Embedder
        A checkpoint (.safetensors from checkpoints.save_pretrained, or a training checkpoint .pt),
        a bundled model's name ("mwmae-tiny-debian", "mae-tiny-debian": models/<name>.safetensors),
        or a preset name ("mwmae-tiny", ...) for a seeded random initialisation. No argument
        (or "") loads the default, the bundled pretrained MW-MAE (checkpoints.DEFAULT_MODEL).
    get_scene_embeddings(audio (n, samples), model) -> float32 (n, D)
    get_timestamp_embeddings(audio (n, samples), model) -> (float32 (n, T, D), float32 (n, T) ms)
Audio is 16 kHz mono in [-1, 1]; results are on the device of `audio`, the work is done on
the model's device (`model.to("cuda")`). Each sound needs at least one 25-ms window (400
samples); NaN or Inf samples, or a log-mel that is not finite (samples far beyond full
scale overflow the power spectrum), raise ValueError naming the rows: never NaN embeddings.

From audio to frames (16 kHz, hop 160 samples = 10 ms, patch height 4 mel frames = 40 ms)
----------------------------------------------------------------------------------------
1. Log-mel of the whole clip (audio.LogMel, centred frames): M = samples // 160 + 1 mel
   frames, frame j centred at j * 10 ms. Long clips are computed in segments of 60 s.
2. Per-clip normalisation with the statistics of the whole clip (audio.normalize).
3. Embedding frame k is the patch row of mel frames 4k..4k+3, centred at 40k + 15 ms.
   A clip gets every frame whose centre lies inside the audio:
       T = max(1, (samples - 240) // 640 + 1)        (see `num_frames`)
   so 4T lies in [M - 2, M + 1]: the last mel frame or two (centred at the very end, made
   mostly of reflect padding) may be left out, and at most one padding frame is needed.
   Exactly 2 s (32000 samples) gives T = 50 frames: one chunk, no padding.
4. Chunks of 200 mel frames: C = ceil(T / 50). The first C * 200 mel frames are used; if the
   clip has fewer, its normalised log-mel is reflect-padded at the end (as the official code
   does, but never by a whole chunk). Chunks of all clips are batched (`batch_size` chunks per
   forward pass), run through `MAE.forward_features` (no masking, final LayerNorm, no CLS) ->
   (50, 5 * dim) each, and the frames that came from padding are dropped.
5. Timestamp embeddings: the T frames, timestamps 40k + 15 ms (evenly spaced, inside the
   audio). Scene embedding: mean over the T frames.
Memory is bounded for long inputs: the log-mel (115 MB per hour) is the largest thing held
per clip; encoder activations exist for one batch of chunks at a time, and scene embeddings
are running sums. Timestamp embeddings of a clip are returned whole (T x D floats).

layout="official" reproduces the AudioMAE++ release's scrambled rows (its forward_features
reads the time-major tokens as if frequency-major: row t' = concat_f' tokens[f' * 50 + t']),
only to compare with the paper's tables; the default "time" layout is the correct one.

Command line
------------
    python embed.py [MODEL] AUDIO_DIR... --out OUT [--timestamps] [--batch-size 32]
                    [--device auto|cpu|cuda|xla] [--layout time|official] [--overwrite]
MODEL is optional: when the first argument is an existing folder it is audio (a model is never
a folder) and the default bundled model is used, which is said on stderr.
writes OUT/embeddings.npy (float32 [files, D], scene embeddings), OUT/files.txt (one path per
row), OUT/model.json (what made the embeddings), OUT/bad_files.tsv (path<TAB>reason for every
file that could not be used: unreadable, not a regular file, non-finite log-mel; they are
skipped) and, with --timestamps, OUT/timestamps/<row>.npz (embeddings [T, D], timestamps
[T] ms). File names are written as the system gives them (surrogate escapes: exact bytes).
OUT is locked while embed runs and must be new or empty unless --overwrite is given (which
first deletes the outputs above, so none of an earlier run survives). Bad options, models
or inputs, and a run that finds no usable audio, end with one line and a non-zero exit.
"""
from __future__ import annotations

import csv
import difflib
import io
import itertools
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import click
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import audio
import checkpoints
import files
import mae

SAMPLE_RATE = audio.SAMPLE_RATE
SEGMENT_FRAMES = 6000  # log-mel of long clips in segments of 60 s
LAYOUTS = ("time", "official")
MIN_SAMPLES = audio.N_FFT  # one 25-ms analysis window: the shortest sound the HEAR API takes
MAX_CHANNELS = 8  # a 2-D input whose second dimension is this small is channels, not time
OUTPUTS = ("embeddings.npy", "files.txt", "bad_files.tsv", "model.json", "timestamps")  # in --out
DEFAULT_MODEL = checkpoints.DEFAULT_MODEL  # the bundled model used when no MODEL is given


# ----------------------------------------------------------------------------- frame arithmetic

def num_frames(samples: int, patch_frames: int = 4) -> int:
    """Embedding frames of a clip: those whose centre (patch_frames * k + (patch_frames - 1) / 2)
    hops lies inside the audio, at least one. For 4-frame patches: (samples - 240) // 640 + 1."""
    edge = audio.HOP * (patch_frames - 1) // 2  # samples from a patch's first frame to its centre
    return max(1, (samples - edge) // (audio.HOP * patch_frames) + 1)


def frame_timestamps(n_frames: int, patch_frames: int = 4) -> torch.Tensor:
    """Centres of the embedding frames in ms: (patch_frames * k + (patch_frames - 1) / 2) * 10."""
    hop_ms = 1000.0 * audio.HOP / SAMPLE_RATE
    k = torch.arange(n_frames, dtype=torch.float64)
    return ((patch_frames * k + (patch_frames - 1) / 2) * hop_ms).float()  # (T,)


def reflect_indices(length: int, target: int) -> torch.Tensor:
    """Indices that extend a sequence of `length` items to `target` by reflection about its
    last item, repeating the reflection as often as needed (numpy's mode='reflect')."""
    idx = torch.arange(target)
    if length == 1:
        return torch.zeros_like(idx)
    period = 2 * (length - 1)
    idx = idx % period
    return torch.where(idx < length, idx, period - idx)


def official_layout(features: torch.Tensor, freq_patches: int) -> torch.Tensor:
    """(B, T', F' * D) time-major rows -> the AudioMAE++ release's rows:
    row t' = concat_f' tokens[f' * T' + t'] of the time-major token sequence."""
    B, T, FD = features.shape
    tokens = features.reshape(B, T * freq_patches, FD // freq_patches)  # token n = t * F' + f
    return tokens.reshape(B, freq_patches, T, FD // freq_patches).transpose(1, 2).reshape(B, T, FD)


# ----------------------------------------------------------------------------- the HEAR model

class Embedder(nn.Module):
    """A frozen MAE encoder and its log-mel frontend, with the HEAR attributes.

    mae: the model (any preset; its input must have 80 mel bins).
    layout: "time" (default, correct) or "official" (AudioMAE++ release scramble).
    batch_size: chunks of 2 s per forward pass.
    source: a string naming where the weights came from (used as a cache key).
    compiled: run the encoder forward through torch.compile (inductor): the same function up
        to float rounding, faster after its first batch, which compiles it (a batch of another
        size, such as the last one, compiles once more with a dynamic batch dimension).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model: mae.MAE, layout: str = "time", batch_size: int = 32, source: str = "",
                 compiled: bool = False):
        super().__init__()
        if model.cfg.input_size[1] != audio.N_MELS:
            raise ValueError(f"the model expects {model.cfg.input_size[1]} mel bins; the frontend gives {audio.N_MELS}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.mae = model.eval().requires_grad_(False)
        self.frontend = audio.LogMel()
        self.layout, self.batch_size, self.source = layout, batch_size, source
        # A compiled function, not a module: self.mae stays the eager model and the state_dict
        # keys stay plain (no "_orig_mod.").
        self.compiled_forward = torch.compile(model.forward_features) if compiled else None
        self.chunk_frames = model.cfg.input_size[0]  # 200 mel frames
        self.patch_frames = model.cfg.patch_size[0]  # 4 mel frames per embedding frame
        self.frames_per_chunk = model.cfg.grid[0]  # 50 embedding frames
        self.scene_embedding_size = int(model.cfg.embedding_size)
        self.timestamp_embedding_size = int(model.cfg.embedding_size)

    @property
    def device(self) -> torch.device:
        return self.frontend.window.device

    def num_frames(self, samples: int) -> int:
        return num_frames(samples, self.patch_frames)

    def timestamps(self, samples: int) -> torch.Tensor:
        return frame_timestamps(self.num_frames(samples), self.patch_frames)

    def describe(self) -> dict:
        """What determines the embeddings (for cache keys and result files)."""
        return {"source": self.source, "layout": self.layout, "config": self.mae.cfg.to_dict()}

    @torch.no_grad()
    def log_mel(self, wave: torch.Tensor, segment_frames: int = SEGMENT_FRAMES) -> torch.Tensor:
        """(samples,) -> (M, 80) log-mel on the model's device, computed in segments of
        `segment_frames` so that a long clip never needs a whole-clip STFT. Each segment is
        cut with two hops of context on the left and one on the right, so its frames equal
        those of the whole-clip transform (the clip's own ends keep their reflect padding)."""
        samples, hop = wave.shape[-1], audio.HOP
        total = max(samples, audio.N_FFT // 2 + 1) // hop + 1
        if total <= segment_frames:
            return self.frontend(wave.to(self.device))
        out = torch.empty(total, audio.N_MELS, device=self.device)
        for a in range(0, total, segment_frames):
            b = min(a + segment_frames, total)
            first = max(0, a - 2)  # frame `a` needs samples from a * hop - 200 on
            piece = wave[first * hop: min(samples, (b + 1) * hop)].to(self.device)
            out[a:b] = self.frontend(piece)[a - first: b - first]
        return out

    @torch.no_grad()
    def chunks(self, wave: torch.Tensor, what: str = "clip") -> tuple[torch.Tensor, list[int]]:
        """(samples,) -> normalised chunks (C, 200, 80) and the frames each one keeps.

        Every way audio enters embedding (files, the HEAR API) passes here, so this is where
        the log-mel is checked: audio.check_finite raises AudioError(what, "log-mel not
        finite ...") for NaN/Inf samples or samples that overflow the frontend (e.g. 1e30),
        which would otherwise give an all-NaN embedding."""
        T = self.num_frames(wave.shape[-1])
        C = math.ceil(T / self.frames_per_chunk)
        log_mel = self.log_mel(wave)
        audio.check_finite(log_mel, what)
        x = audio.normalize(log_mel)[: C * self.chunk_frames]  # (<= C * 200, 80)
        if x.shape[0] < C * self.chunk_frames:
            x = x[reflect_indices(x.shape[0], C * self.chunk_frames).to(x.device)]
        kept = [self.frames_per_chunk] * (C - 1) + [T - self.frames_per_chunk * (C - 1)]
        return x.reshape(C, self.chunk_frames, -1), kept

    @torch.no_grad()
    def features(self, chunks: torch.Tensor) -> torch.Tensor:
        """(B, 200, 80) -> (B, 50, D) frame embeddings in the chosen layout."""
        chunks = chunks.to(self.device)
        if self.compiled_forward is not None:
            out = self.compiled_forward(chunks)
        else:
            out = self.mae.forward_features(chunks)
        if self.layout == "official":
            out = official_layout(out, self.mae.cfg.grid[1])
        return out


def load_model(model_file_path: str | None = None, layout: str = "time", seed: int = 0,
               batch_size: int = 32, compiled: bool = False) -> Embedder:
    """HEAR entry point: a checkpoint file (checkpoints.load_pretrained), a bundled model's name
    (checkpoints.bundled_models), or a preset name from mae.PRESETS, which gives a random
    initialisation drawn with torch seed `seed`. None or "" (HEAR's "no file") loads the
    default, the bundled pretrained checkpoints.DEFAULT_MODEL.

    Raises checkpoints.CheckpointError (a ValueError) for a file that is not a model, ValueError for
    an unknown name, FileNotFoundError for a missing file (a name with a folder or suffix, or
    the default model's file); every message is one line naming the file. compiled: see Embedder."""
    name = str(model_file_path or checkpoints.DEFAULT_MODEL)
    if name in mae.PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = mae.build(name)
        source = f"preset {name}, seed {seed}"
    else:
        path = checkpoints.resolve_model(name)
        if path is None:
            raise unknown_model(name)
        model = checkpoints.load_pretrained(path)
        stat = path.stat()
        source = f"{path.resolve()} ({stat.st_size} bytes, mtime {stat.st_mtime_ns})"
    return Embedder(model, layout=layout, batch_size=batch_size, source=source, compiled=compiled)


def unknown_model(name: str) -> Exception:
    """The error for a MODEL that is neither a preset, a bundled model nor a regular file, with
    the names closest to what was typed (a misspelt name is the usual cause)."""
    if os.path.lexists(name):
        return checkpoints.CheckpointError(f"{files.shown(name)}: not a model file (not a regular file)")
    bundled = list(checkpoints.bundled_models())
    if name == checkpoints.DEFAULT_MODEL:
        return checkpoints.MissingCheckpointError(
            f"the default model {name} is missing: no file "
            f"{files.shown(checkpoints.MODELS_DIR / (name + checkpoints.MODEL_SUFFIX))}; give MODEL "
            f"(a model file, a bundled model: {', '.join(bundled) or 'none here'}, or a preset)")
    closest = difflib.get_close_matches(name, bundled + mae.PRESETS, n=1)
    hint = f"; did you mean {closest[0]}?" if closest else ""
    message = (f"{files.shown(name)!r} is neither a model file nor a preset nor a bundled model{hint} "
               f"(bundled: {', '.join(bundled) or 'none'}; presets: {', '.join(mae.PRESETS)})")
    looks_like_a_path = os.sep in name or Path(name).suffix
    return FileNotFoundError(message) if looks_like_a_path else ValueError(message)


# ----------------------------------------------------------------------------- streaming core

Prepared = tuple[int, torch.Tensor, list[int]]  # (clip index, chunks (C, 200, 80), frames kept per chunk)


def frame_pieces(clips: Iterable, model: Embedder) -> Iterator[tuple[int, torch.Tensor]]:
    """Frame embeddings of a stream of clips, computed in batches of chunks across clips.

    clips: 1-D waveforms (tensors or arrays, 16 kHz). Yields (clip index, frames (t, D)) on the
    model's device; the pieces of a clip come one after another and concatenate to its
    (T, D) timestamp embedding. Only `model.batch_size` chunks are encoded at a time.
    Raises ValueError for a clip that is not a non-empty 1-D waveform or whose log-mel is not
    finite ("clip 3: log-mel not finite ...").
    """
    return encode_chunks(wave_chunks(clips, model), model)


def wave_chunks(clips: Iterable, model: Embedder) -> Iterator[Prepared]:
    """The normalised chunks of each waveform, one clip at a time."""
    for index, wave in enumerate(clips):
        wave = torch.as_tensor(wave, dtype=torch.float32)
        if wave.ndim != 1 or wave.numel() == 0:
            raise ValueError(f"clip {index}: expected a non-empty 1-D waveform, got shape {tuple(wave.shape)}")
        try:
            chunks, kept = model.chunks(wave, what=f"clip {index}")
        except audio.AudioError as error:  # the HEAR API promises ValueError for bad input
            raise ValueError(str(error)) from None
        yield index, chunks, kept


def encode_chunks(prepared: Iterable[Prepared], model: Embedder) -> Iterator[tuple[int, torch.Tensor]]:
    """Encode the chunks of consecutive clips `model.batch_size` at a time; yields
    (clip index, frames (t, D)) pieces in clip order."""
    queue: list[tuple[int, torch.Tensor, int]] = []  # (clip index, chunk (200, 80), frames kept)
    for index, chunks, kept in prepared:
        queue.extend(zip(itertools.repeat(index), chunks, kept))
        while len(queue) >= model.batch_size:
            yield from _encode(queue[: model.batch_size], model)
            del queue[: model.batch_size]
    if queue:
        yield from _encode(queue, model)


def _encode(batch: list[tuple[int, torch.Tensor, int]], model: Embedder) -> Iterator[tuple[int, torch.Tensor]]:
    """One forward pass; yields one trimmed piece per clip in the batch."""
    features = model.features(torch.stack([chunk for _, chunk, _ in batch]))  # (B, 50, D)
    trimmed = [(index, features[i, :kept]) for i, (index, _, kept) in enumerate(batch)]
    for index, group in itertools.groupby(trimmed, key=lambda item: item[0]):
        yield index, torch.cat([frames for _, frames in group])


def whole_clips(pieces: Iterable[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
    """Pieces joined into (clip index, frame embeddings (T, D)) per clip."""
    for index, group in itertools.groupby(pieces, key=lambda item: item[0]):
        yield index, torch.cat([frames for _, frames in group])


def clip_means(pieces: Iterable[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
    """(clip index, mean frame embedding (D,)) per clip, as running sums over its pieces."""
    for index, group in itertools.groupby(pieces, key=lambda item: item[0]):
        total, count = 0.0, 0
        for _, frames in group:
            total, count = total + frames.sum(0), count + frames.shape[0]
        yield index, total / count


def timestamp_embeddings(clips: Iterable, model: Embedder) -> Iterator[tuple[int, torch.Tensor]]:
    """(clip index, frame embeddings (T, D)) for every clip, in order."""
    return whole_clips(frame_pieces(clips, model))


def scene_embeddings(clips: Iterable, model: Embedder) -> Iterator[tuple[int, torch.Tensor]]:
    """(clip index, mean frame embedding (D,)) for every clip, in order, as running sums."""
    return clip_means(frame_pieces(clips, model))


# ----------------------------------------------------------------------------- HEAR functions

def _check_batch(audio) -> torch.Tensor:
    """The HEAR input as float32 (n_sounds, n_samples), refusing what would give garbage:
    channel-shaped or too-short sounds (e.g. (32000, 2) would be 32,000 sounds of 2 samples)
    and NaN/Inf samples (named by row, before any work; values that overflow the frontend
    are caught after it, in Embedder.chunks)."""
    audio = torch.as_tensor(audio)
    shape = tuple(audio.shape)
    if audio.ndim != 2 or audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"expected audio of shape (n_sounds, n_samples), got {shape}")
    if audio.shape[1] < MIN_SAMPLES:
        if audio.shape[1] <= MAX_CHANNELS < audio.shape[0]:
            raise ValueError(f"expected (n_sounds, n_samples) mono audio; got {shape}: "
                             f"pass audio.T / mix down channels")
        raise ValueError(f"each sound needs at least {MIN_SAMPLES} samples (one 25-ms window at "
                         f"{SAMPLE_RATE} Hz); got audio of shape {shape}")
    audio = audio.float()
    bad_rows = (~torch.isfinite(audio)).any(dim=1).nonzero().flatten().tolist()
    if bad_rows:
        listed = ", ".join(map(str, bad_rows[:10])) + (", ..." if len(bad_rows) > 10 else "")
        raise ValueError(f"audio rows {listed} ({len(bad_rows)} of {shape[0]}) hold NaN or Inf samples")
    return audio


def get_scene_embeddings(audio, model: Embedder) -> torch.Tensor:
    """(n, samples) 16 kHz audio -> float32 (n, D): the mean of the timestamp embeddings."""
    audio = _check_batch(audio)
    embeddings = [e for _, e in scene_embeddings(audio, model)]
    return torch.stack(embeddings).to(audio.device)


def get_timestamp_embeddings(audio, model: Embedder) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, samples) 16 kHz audio -> (float32 (n, T, D) embeddings, float32 (n, T) timestamps in
    ms at the frame centres, 40 ms apart)."""
    audio = _check_batch(audio)
    embeddings = torch.stack([e for _, e in timestamp_embeddings(audio, model)]).to(audio.device)
    timestamps = model.timestamps(audio.shape[1]).to(audio.device).expand(audio.shape[0], -1)
    return embeddings, timestamps.contiguous()


# ----------------------------------------------------------------------------- files

def file_chunks(paths: Iterable[str], model: Embedder, usable: list[str], bad: dict[str, str]) -> Iterator[Prepared]:
    """The chunks of every usable file, numbered in order; appends each such path to `usable`
    and records every other one in `bad` (path -> reason: unreadable, not a regular file,
    non-finite log-mel) instead of raising."""
    for path in paths:
        try:
            wave = torch.from_numpy(audio.load_audio(path))
            chunks, kept = model.chunks(wave, what=files.shown(path))
        except audio.AudioError as error:
            bad[path] = error.reason
            continue
        usable.append(path)
        yield len(usable) - 1, chunks, kept


def embed_files(paths: Iterable[str], model: Embedder, bad: dict[str, str],
                timestamps: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, embedding) for every usable file, in order: the scene embedding (D,), or with
    `timestamps` the frame embeddings (T, D). Files that cannot be used are left out and
    recorded in `bad` as {path: reason}; no NaN embedding is ever yielded."""
    usable: list[str] = []
    pieces = encode_chunks(file_chunks(paths, model, usable, bad), model)
    for index, embedding in whole_clips(pieces) if timestamps else clip_means(pieces):
        yield usable[index], embedding


def write_bad_files(path: Path, bad: dict[str, str]) -> None:
    """path<TAB>reason lines, sorted; csv quoting keeps names with tabs or newlines intact and
    file names are written as their own bytes (data.read_bad_files reads the same format)."""
    text = io.StringIO()
    csv.writer(text, delimiter="\t", lineterminator="\n").writerows(sorted(bad.items()))
    files.write_text(path, text.getvalue())


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    files.atomic_write(path, write)


def save_npz(path: Path, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    files.atomic_write(path, write)


def default_model_note() -> str:
    """The stderr line of a command run without MODEL."""
    return (f"no MODEL given: using the bundled pretrained {checkpoints.DEFAULT_MODEL} "
            f"({files.shown(checkpoints.MODELS_DIR / (checkpoints.DEFAULT_MODEL + checkpoints.MODEL_SUFFIX))})")


def model_and_folders(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """click callback splitting "[MODEL] FOLDER..." into (MODEL or None, the folders): the
    first value is a folder of inputs when it is an existing folder (a model is never a
    folder), else MODEL. Each folder must exist (click's own message)."""
    model = None if os.path.isdir(values[0]) else values[0]
    folders = values[1:] if model is not None else values
    if not folders:
        raise click.BadParameter(f"{model!r} is taken as MODEL (it is not a folder): give at least "
                                 f"one folder after it", ctx=ctx, param=param)
    exists = click.Path(exists=True)
    return model, tuple(exists.convert(folder, param, ctx) for folder in folders)


def load_model_or_fail(model_path: str | None, **options) -> Embedder:
    """load_model for the command line: any problem with MODEL is one line, and a preset
    (random weights) is said so on stderr, since it is easily mistaken for a trained model;
    so is the default used when MODEL is None."""
    try:
        model = load_model(model_path, **options)
    except (ValueError, OSError) as error:  # checkpoints.CheckpointError is a ValueError
        raise click.ClickException(str(error)) from None
    if model_path is None:
        click.echo(default_model_note(), err=True)
    elif model_path in mae.PRESETS:
        click.echo(f"{model_path} is a preset: random initialisation (seed {options['seed']}), "
                   f"not pretrained weights", err=True)
    return model


def find_audio_or_fail(audio_dirs: tuple[str, ...], bad: dict[str, str]) -> list[str]:
    """The regular files under AUDIO_DIR... (anything else goes into `bad`); none is an error."""
    try:
        paths = audio.find_files(audio_dirs, skipped=bad)
    except OSError as error:
        raise click.ClickException(f"cannot list the audio: {error}") from None
    if not paths and not bad:
        raise click.ClickException(f"no audio files found under {', '.join(map(files.shown, audio_dirs))}")
    return paths


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def embed_into(out: Path, model: Embedder, paths: list[str], bad: dict[str, str],
               timestamps: bool) -> tuple[list[str], list[np.ndarray]]:
    """Embed `paths`, writing OUT/timestamps/<row>.npz on the way if asked; returns the
    embedded files and their scene embeddings (D,). Unusable files go to `bad`."""
    good, rows = [], []
    for path, embedding in embed_files(tqdm(paths, desc="embedding", unit="file"), model, bad, timestamps):
        embedding = embedding.cpu()
        if timestamps:
            stamps = frame_timestamps(embedding.shape[0], model.patch_frames).numpy()
            save_npz(out / "timestamps" / f"{len(rows):06d}.npz", embeddings=embedding.numpy(), timestamps=stamps)
            embedding = embedding.mean(0)
        good.append(path)
        rows.append(embedding.numpy())
    return good, rows


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="[MODEL] AUDIO_DIR...", callback=model_and_folders)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (new or empty, see --overwrite).")
@click.option("--timestamps", is_flag=True, help="Also write per-file timestamp embeddings.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="2-s chunks per forward pass.")
@click.option("--device", type=mae.DeviceChoice(), default="auto", show_default=True)
@click.option("--layout", type=click.Choice(LAYOUTS), default="time", show_default=True,
              help="'official' reproduces the AudioMAE++ release's scrambled layout.")
@click.option("--seed", default=0, show_default=True, help="Seed of a preset's random initialisation.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run in --out.")
@click.option("--compile", "compiled", is_flag=True,
              help="Compile the encoder forward with torch.compile (cpu, cuda): faster on many "
                   "files, after a first batch that compiles it.")
def main(inputs, out, timestamps, batch_size, device, layout, seed, overwrite, compiled):
    """Embed every audio file under AUDIO_DIR... with MODEL: a model file, a bundled model's name
    (mwmae-tiny-debian, mae-tiny-debian) or a preset name (random weights).

    MODEL is optional: when the first argument is an existing folder it is audio (a model is
    never a folder) and the bundled pretrained MW-MAE (mwmae-tiny-debian) is used.

    Writes OUT/embeddings.npy (scene embeddings, float32 [files, D]), OUT/files.txt (the file
    of each row), OUT/bad_files.tsv (files that could not be used, skipped) and, with
    --timestamps, OUT/timestamps/<row>.npz holding `embeddings` [T, D] and `timestamps` [T] (ms).
    """
    (model_path, audio_dirs), out = inputs, Path(out)
    mae.check_compile_device(compiled, device)
    model = load_model_or_fail(model_path, layout=layout, seed=seed, batch_size=batch_size,
                               compiled=compiled)
    model = model.to(device)
    bad: dict[str, str] = {}
    paths = find_audio_or_fail(audio_dirs, bad)
    try:
        with files.OutputFolder(out, own=OUTPUTS, overwrite=overwrite):
            good, rows = embed_into(out, model, paths, bad, timestamps)
            write_bad_files(out / "bad_files.tsv", bad)
            if not good:
                raise click.ClickException(
                    f"no readable audio under {', '.join(map(files.shown, audio_dirs))}: "
                    f"{plural(len(bad), 'file')} skipped, see {files.shown(out / 'bad_files.tsv')}")
            embeddings = np.stack(rows).astype(np.float32)
            save_npy(out / "embeddings.npy", embeddings)
            files.write_text(out / "files.txt", "".join(f"{path}\n" for path in good))
            files.write_json(out / "model.json", model.describe())
    except (files.OutputError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{plural(len(good), 'file')} embedded -> {files.shown(out / 'embeddings.npy')} "
               f"{embeddings.shape}; {plural(len(bad), 'bad file')} skipped "
               f"(listed in {files.shown(out / 'bad_files.tsv')})")


if __name__ == "__main__":
    main()
