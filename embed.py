"""Frozen-encoder embeddings in the HEAR API, and a command line to embed audio folders.

HEAR API (module level, so `embed` is a HEAR module as it is)
------------------------------------------------------------
    load_model(model_file_path="mwmae-tiny", layout="time", seed=0, batch_size=32) -> Embedder
        A checkpoint (.safetensors from mae.save_pretrained, or a training checkpoint .pt),
        or a preset name ("mwmae-tiny", ...) for a seeded random initialisation.
    get_scene_embeddings(audio (n, samples), model) -> float32 (n, D)
    get_timestamp_embeddings(audio (n, samples), model) -> (float32 (n, T, D), float32 (n, T) ms)
Audio is 16 kHz mono in [-1, 1]; results are on the device of `audio`, the work is done on
the model's device (`model.to("cuda")`).

From audio to frames (16 kHz, hop 160 samples = 10 ms, patch height 4 mel frames = 40 ms)
----------------------------------------------------------------------------------------
1. Log-mel of the whole clip (data.LogMel, centred frames): M = samples // 160 + 1 mel
   frames, frame j centred at j * 10 ms. Long clips are computed in segments of 60 s.
2. Per-clip normalisation with the statistics of the whole clip (data.normalize).
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
    python embed.py MODEL AUDIO_DIR... --out OUT [--timestamps] [--batch-size 32]
                    [--device auto|cpu|cuda] [--layout time|official]
writes OUT/embeddings.npy (float32 [files, D], scene embeddings), OUT/files.txt (one path per
row), OUT/model.json (what made the embeddings), OUT/bad_files.tsv (path<TAB>reason for every
file that could not be read; they are skipped) and, with --timestamps, OUT/timestamps/<row>.npz
(embeddings [T, D], timestamps [T] ms).
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import click
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import data
import files
import mae

SAMPLE_RATE = data.SAMPLE_RATE
SEGMENT_FRAMES = 6000  # log-mel of long clips in segments of 60 s
LAYOUTS = ("time", "official")


# ----------------------------------------------------------------------------- frame arithmetic

def num_frames(samples: int, patch_frames: int = 4) -> int:
    """Embedding frames of a clip: those whose centre (patch_frames * k + (patch_frames - 1) / 2)
    hops lies inside the audio, at least one. For 4-frame patches: (samples - 240) // 640 + 1."""
    edge = data.HOP * (patch_frames - 1) // 2  # samples from a patch's first frame to its centre
    return max(1, (samples - edge) // (data.HOP * patch_frames) + 1)


def frame_timestamps(n_frames: int, patch_frames: int = 4) -> torch.Tensor:
    """Centres of the embedding frames in ms: (patch_frames * k + (patch_frames - 1) / 2) * 10."""
    hop_ms = 1000.0 * data.HOP / SAMPLE_RATE
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
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, model: mae.MAE, layout: str = "time", batch_size: int = 32, source: str = ""):
        super().__init__()
        if model.cfg.input_size[1] != data.N_MELS:
            raise ValueError(f"the model expects {model.cfg.input_size[1]} mel bins; the frontend gives {data.N_MELS}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.mae = model.eval().requires_grad_(False)
        self.frontend = data.LogMel()
        self.layout, self.batch_size, self.source = layout, batch_size, source
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
        samples, hop = wave.shape[-1], data.HOP
        total = max(samples, data.N_FFT // 2 + 1) // hop + 1
        if total <= segment_frames:
            return self.frontend(wave.to(self.device))
        out = torch.empty(total, data.N_MELS, device=self.device)
        for a in range(0, total, segment_frames):
            b = min(a + segment_frames, total)
            first = max(0, a - 2)  # frame `a` needs samples from a * hop - 200 on
            piece = wave[first * hop: min(samples, (b + 1) * hop)].to(self.device)
            out[a:b] = self.frontend(piece)[a - first: b - first]
        return out

    @torch.no_grad()
    def chunks(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(samples,) -> normalised chunks (C, 200, 80) and the frames each one keeps."""
        T = self.num_frames(wave.shape[-1])
        C = math.ceil(T / self.frames_per_chunk)
        x = data.normalize(self.log_mel(wave))[: C * self.chunk_frames]  # (<= C * 200, 80)
        if x.shape[0] < C * self.chunk_frames:
            x = x[reflect_indices(x.shape[0], C * self.chunk_frames).to(x.device)]
        kept = [self.frames_per_chunk] * (C - 1) + [T - self.frames_per_chunk * (C - 1)]
        return x.reshape(C, self.chunk_frames, -1), kept

    @torch.no_grad()
    def features(self, chunks: torch.Tensor) -> torch.Tensor:
        """(B, 200, 80) -> (B, 50, D) frame embeddings in the chosen layout."""
        out = self.mae.forward_features(chunks.to(self.device))
        if self.layout == "official":
            out = official_layout(out, self.mae.cfg.grid[1])
        return out


def load_model(model_file_path: str = "mwmae-tiny", layout: str = "time", seed: int = 0,
               batch_size: int = 32) -> Embedder:
    """HEAR entry point: a checkpoint file (mae.load_pretrained) or a preset name from
    mae.PRESETS, which gives a random initialisation drawn with torch seed `seed`."""
    name = str(model_file_path)
    if name in mae.PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = mae.build(name)
        source = f"preset {name}, seed {seed}"
    elif Path(name).is_file():
        model = mae.load_pretrained(name)
        stat = Path(name).stat()
        source = f"{Path(name).resolve()} ({stat.st_size} bytes, mtime {stat.st_mtime_ns})"
    else:
        raise FileNotFoundError(f"{name!r} is neither a checkpoint file nor a preset ({', '.join(mae.PRESETS)})")
    return Embedder(model, layout=layout, batch_size=batch_size, source=source)


# ----------------------------------------------------------------------------- streaming core

def frame_pieces(clips: Iterable, model: Embedder) -> Iterator[tuple[int, torch.Tensor]]:
    """Frame embeddings of a stream of clips, computed in batches of chunks across clips.

    clips: 1-D waveforms (tensors or arrays, 16 kHz). Yields (clip index, frames (t, D)) on the
    model's device; the pieces of a clip come one after another and concatenate to its
    (T, D) timestamp embedding. Only `model.batch_size` chunks are encoded at a time.
    """
    queue: list[tuple[int, torch.Tensor, int]] = []  # (clip index, chunk (200, 80), frames kept)
    for index, wave in enumerate(clips):
        wave = torch.as_tensor(wave, dtype=torch.float32)
        if wave.ndim != 1 or wave.numel() == 0:
            raise ValueError(f"clip {index}: expected a non-empty 1-D waveform, got shape {tuple(wave.shape)}")
        chunks, kept = model.chunks(wave)
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


def timestamp_embeddings(clips: Iterable, model: Embedder) -> Iterator[tuple[int, torch.Tensor]]:
    """(clip index, frame embeddings (T, D)) for every clip, in order."""
    for index, pieces in itertools.groupby(frame_pieces(clips, model), key=lambda item: item[0]):
        yield index, torch.cat([frames for _, frames in pieces])


def scene_embeddings(clips: Iterable, model: Embedder) -> Iterator[tuple[int, torch.Tensor]]:
    """(clip index, mean frame embedding (D,)) for every clip, in order, as running sums."""
    for index, pieces in itertools.groupby(frame_pieces(clips, model), key=lambda item: item[0]):
        total, count = 0.0, 0
        for _, frames in pieces:
            total, count = total + frames.sum(0), count + frames.shape[0]
        yield index, total / count


# ----------------------------------------------------------------------------- HEAR functions

def _check_batch(audio) -> torch.Tensor:
    audio = torch.as_tensor(audio)
    if audio.ndim != 2 or audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"expected audio of shape (n_sounds, n_samples), got {tuple(audio.shape)}")
    return audio.float()


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

def read_clips(paths: Iterable[str], good: list[str], bad: dict[str, str]) -> Iterator[np.ndarray]:
    """Waveforms of the readable files; appends each yielded path to `good` and records
    every unreadable one in `bad` (path -> reason) instead of raising."""
    for path in paths:
        try:
            wave = data.load_audio(path)
        except data.AudioError as error:
            bad[path] = error.reason
            continue
        good.append(path)
        yield wave


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    return device


def write_bad_files(path: Path, bad: dict[str, str]) -> None:
    text = "".join(f"{name}\t{reason}\n" for name, reason in sorted(bad.items()))
    files.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


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


@click.command()
@click.argument("model_path", metavar="MODEL")
@click.argument("audio_dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--timestamps", is_flag=True, help="Also write per-file timestamp embeddings.")
@click.option("--batch-size", default=32, show_default=True, help="2-s chunks per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--layout", type=click.Choice(LAYOUTS), default="time", show_default=True,
              help="'official' reproduces the AudioMAE++ release's scrambled layout.")
@click.option("--seed", default=0, show_default=True, help="Seed of a preset's random initialisation.")
def main(model_path, audio_dirs, out, timestamps, batch_size, device, layout, seed):
    """Embed every audio file under AUDIO_DIR... with MODEL (a checkpoint or a preset name).

    Writes OUT/embeddings.npy (scene embeddings, float32 [files, D]), OUT/files.txt (the file
    of each row), OUT/bad_files.tsv (unreadable files, skipped) and, with --timestamps,
    OUT/timestamps/<row>.npz holding `embeddings` [T, D] and `timestamps` [T] (ms).
    """
    out = Path(out)
    model = load_model(model_path, layout=layout, seed=seed, batch_size=batch_size).to(pick_device(device))
    paths = data.find_files(audio_dirs)
    good, bad, rows = [], {}, []
    clips = read_clips(tqdm(paths, desc="embedding", unit="file"), good, bad)
    if timestamps:
        for index, frames in timestamp_embeddings(clips, model):
            frames = frames.cpu()
            rows.append(frames.mean(0).numpy())
            stamps = frame_timestamps(frames.shape[0], model.patch_frames).numpy()
            save_npz(out / "timestamps" / f"{index:06d}.npz", embeddings=frames.numpy(), timestamps=stamps)
    else:
        rows = [embedding.cpu().numpy() for _, embedding in scene_embeddings(clips, model)]
    embeddings = np.stack(rows) if rows else np.zeros((0, model.scene_embedding_size), np.float32)
    save_npy(out / "embeddings.npy", embeddings.astype(np.float32))
    files.atomic_write(out / "files.txt", lambda tmp: Path(tmp).write_text("".join(f"{p}\n" for p in good)))
    write_bad_files(out / "bad_files.tsv", bad)
    description = json.dumps(model.describe(), indent=1) + "\n"
    files.atomic_write(out / "model.json", lambda tmp: Path(tmp).write_text(description))
    click.echo(f"{len(good)} files embedded -> {out / 'embeddings.npy'} {embeddings.shape}; "
               f"{len(bad)} bad files skipped (listed in {out / 'bad_files.tsv'})")


if __name__ == "__main__":
    main()
