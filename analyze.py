"""The attention analyses of the MW-MAE paper (§5, Figures 3-4), for any of our models.

    python analyze.py MODEL... AUDIO_DIR --out DIR [--max-files N] [--seed 0] [--overwrite]

MODEL: a model file (checkpoints.load_pretrained: a .safetensors file or a training checkpoint
.pt), a bundled model's name (mwmae-tiny-debian) or a preset (random weights, seeded). Several
MODELs, e.g. checkpoints of one run, are analysed on the same crops and masks and drawn in the
same figures, so entropies can be followed over pretraining (Fig. 3a).

Inputs: up to --max-files audio files under AUDIO_DIR (a seeded random sample when there are
more), cut into 2-s crops exactly as embedding does (embed.Embedder.chunks). Files that cannot
be used are skipped and listed in analysis.json. For every crop:
- encoder: unmasked, as for embeddings;
- decoder: on a masked input as in pretraining (the model's own random masking, with noise
  drawn from --seed, the same for every MODEL).
The probabilities come from attention.attention_maps (recomputed from each layer's weights).

Per head and block (queries are the patch tokens; a CLS token is a key for the entropy only):
- entropy: mean over queries of -sum_j p_ij log p_ij (nats), and normalised by its maximum,
  log(window) (log(n) for a global head), so heads of different windows compare;
- mean attention distance on the real patch grid (time x frequency, 50 x 5 for 4x16 patches
  on 200 x 80): sum_j p_ij |t_i - t_j| and sum_j p_ij |f_i - f_j| in patches, in ms and mel
  bins, and the Euclidean distance in patches; a CLS key's share is left out (it has no place
  on the grid) and the rest renormalised;
- PWCCA (Morcos et al. 2018) between the outputs (before W_O) of every pair of heads of all
  blocks of a stack, on --tokens-per-crop random patch tokens of each crop. PWCCA is not
  symmetric: entry [i, j] weights by the canonical variates of head i.

Outputs in --out: analysis.json (every number behind the figures), entropy.png (Fig. 3a:
entropy per head against block), distance.png (Fig. 3b: per-crop mean distances of the first
two and last two blocks), pwcca.png (Fig. 4: heat maps, block separators, window of each head).
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path
from typing import Iterator

import click
import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

import audio
import embed
import files
from attention import attention_maps, head_windows

OUTPUTS = ("analysis.json", "entropy.png", "distance.png", "pwcca.png")
STACKS = ("encoder", "decoder")
MS_PER_MEL_FRAME = 1000.0 * audio.HOP / audio.SAMPLE_RATE  # 10 ms


# ----------------------------------------------------------------------------- PWCCA

def whitening(scatter: np.ndarray, rank_tol: float = 1e-10) -> np.ndarray:
    """W (a, r) with W^T scatter W = I_r: the inverse square root of a symmetric scatter matrix
    on its range. Directions with variance below rank_tol * the largest are dropped (a head
    whose outputs span fewer than d dimensions)."""
    values, vectors = np.linalg.eigh(scatter)
    keep = values > rank_tol * values.max()
    return vectors[:, keep] / np.sqrt(values[keep])


def pwcca(x: np.ndarray, y: np.ndarray) -> float:
    """Projection-weighted canonical correlation of two representations of the same samples.

    Morcos, Raghu & Bengio, "Insights on representational similarity in neural networks with
    canonical correlation", NeurIPS 2018, §3. x: (samples, a), y: (samples, b).
    1. CCA: centre both; the SVD of the whitened cross-covariance
       Sxx^-1/2 Sxy Syy^-1/2 = U diag(rho) V^T gives the canonical correlations rho_i and the
       canonical variates of x, h_i = x Sxx^-1/2 u_i.
    2. Projection weights from the first representation: alpha_i = sum_j |<h_i, x_j>| over its
       neurons x_j (columns of x), h_i of unit length, alpha normalised to sum 1.
    3. PWCCA = sum_i alpha_i rho_i: 1 for representations equal up to an invertible linear
       map, near 0 for independent ones.
    """
    x, y = x - x.mean(0), y - y.mean(0)
    wx, wy = whitening(x.T @ x), whitening(y.T @ y)
    u, rho, _ = np.linalg.svd(wx.T @ (x.T @ y) @ wy, full_matrices=False)
    variates = x @ (wx @ u)  # (samples, k), orthogonal columns
    variates /= np.linalg.norm(variates, axis=0)
    alpha = np.abs(variates.T @ x).sum(axis=1)
    return float(alpha @ np.clip(rho, 0.0, 1.0) / alpha.sum())


def pwcca_matrix(heads: list[np.ndarray]) -> np.ndarray:
    """[i, j] = pwcca(heads[i], heads[j]) for per-head outputs (samples, d) each.

    The same numbers as calling pwcca for every pair, with each head's work done once: its
    whitened outputs z = x Sxx^-1/2 (orthonormal columns), so that the whitened cross-
    covariance of a pair is z_i^T z_j, and z^T x, so that the canonical variates' overlaps
    with the neurons are U^T (z_i^T x_i). Thousands of small SVDs: torch on one thread, since
    threads make each one ~30x slower on a busy CPU."""
    with one_thread():
        centred = [torch.from_numpy((x - x.mean(0)).astype(np.float64)) for x in heads]
        whitened = [x @ torch.from_numpy(whitening((x.T @ x).numpy())) for x in centred]
        overlaps = [z.T @ x for z, x in zip(whitened, centred)]
        matrix = np.empty((len(heads), len(heads)))
        for i, (zi, overlap) in enumerate(zip(whitened, overlaps)):
            for j, zj in enumerate(whitened):
                u, rho = singular_pairs(zi.T @ zj)
                alpha = (u.T @ overlap).abs().sum(1)
                matrix[i, j] = float(alpha @ rho.clamp(0.0, 1.0) / alpha.sum())
    return matrix


def singular_pairs(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of m (a, b), the min(a, b) largest. LAPACK's
    SVD can fail to converge on matrices with many repeated singular values (a head against
    itself gives the identity); then the symmetric eigenproblem of m m^T, which always
    converges, gives the same pairs: m m^T = U diag(rho^2) U^T."""
    try:
        u, rho, _ = torch.linalg.svd(m, full_matrices=False)
        return u, rho
    except torch.linalg.LinAlgError:
        values, vectors = torch.linalg.eigh(m @ m.T)
        top = values.argsort(descending=True)[: min(m.shape)]
        return vectors[:, top], values[top].clamp(min=0.0).sqrt()


@contextlib.contextmanager
def one_thread():
    """torch on one thread while inside."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- per-layer statistics

def grid_offsets(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """|t_i - t_j| and |f_i - f_j| (L, L) in patches for time-major tokens i = t * F' + f."""
    t, f = torch.arange(grid[0] * grid[1]).div(grid[1], rounding_mode="floor"), torch.arange(grid[0] * grid[1]) % grid[1]
    return (t[:, None] - t[None, :]).abs().double(), (f[:, None] - f[None, :]).abs().double()


def layer_statistics(probs: torch.Tensor, prefix: int, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per crop and head (B, H): entropy (nats) and mean attention distances (patches) of the
    patch queries. probs: (B, H, prefix + L, prefix + L)."""
    probs = probs[:, :, prefix:].double()  # patch queries, all keys
    entropy = torch.special.entr(probs).sum(-1).mean(-1)
    on_grid = probs[..., prefix:]
    on_grid = on_grid / on_grid.sum(-1, keepdim=True)  # a CLS key's share left out
    dt, df = (offset.to(probs.device) for offset in grid_offsets(grid))
    mean = lambda distance: (on_grid * distance).sum(-1).mean(-1).cpu().numpy()  # noqa: E731
    return {"entropy": entropy.cpu().numpy(), "time": mean(dt), "freq": mean(df),
            "euclidean": mean((dt ** 2 + df ** 2).sqrt())}


@contextlib.contextmanager
def recorded_inputs(blocks) -> Iterator[list]:
    """Record the (args) each block's attention layer is called with, while inside."""
    calls = []
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: calls.append((module, args)))
             for block in blocks]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def stack_inputs(model, crops: torch.Tensor, noise: torch.Tensor) -> dict[str, list]:
    """The inputs of every attention layer: encoder unmasked, decoder after masking by noise."""
    with torch.no_grad():
        with recorded_inputs(model.blocks) as encoder:
            model.forward_encoder(crops, mask_ratio=0.0)
        with recorded_inputs(model.decoder_blocks) as decoder:
            latent, _, ids_restore = model.forward_encoder(crops, model.cfg.mask_ratio, noise)
            model.forward_decoder(latent, ids_restore)
    return {"encoder": encoder, "decoder": decoder}


class StackRecorder:
    """Accumulates one stack's per-crop statistics and PWCCA samples over batches."""

    def __init__(self, prefix: int, grid: tuple[int, int], tokens_per_crop: int, generator: torch.Generator):
        self.prefix, self.grid = prefix, grid
        self.tokens_per_crop, self.generator = tokens_per_crop, generator
        self.stats: list[dict[str, list]] = []  # per block: name -> [(B, H) arrays]
        self.samples: list[list[torch.Tensor]] = []  # per block: [(B * tokens, H, d)]
        self.windows: list[list[int]] = []

    def add(self, calls: list) -> None:
        if not self.stats:
            self.stats = [{} for _ in calls]
            self.samples = [[] for _ in calls]
            self.windows = [head_windows(attn, args[0].shape[1]) for attn, args in calls]
        for block, (attn, args) in enumerate(calls):
            maps = attention_maps(attn, *args)
            for name, value in layer_statistics(maps.probs, self.prefix, self.grid).items():
                self.stats[block].setdefault(name, []).append(value)
            self.samples[block].append(self.token_sample(maps.head_outputs))

    def token_sample(self, head_outputs: torch.Tensor) -> torch.Tensor:
        """(B, H, n, d) -> (B * k, H, d): k random patch tokens of each crop."""
        B, H, n, d = head_outputs.shape
        patches = n - self.prefix
        picks = torch.stack([torch.randperm(patches, generator=self.generator)[: self.tokens_per_crop]
                             for _ in range(B)]) + self.prefix  # (B, k)
        chosen = head_outputs.transpose(1, 2)[torch.arange(B)[:, None], picks.to(head_outputs.device)]
        return chosen.reshape(-1, H, d).double().cpu()

    def summary(self, patch_size: tuple[int, int]) -> dict:
        """Every number of this stack for analysis.json."""
        per_crop = [{name: np.concatenate(values) for name, values in block.items()} for block in self.stats]
        mean = lambda name: [block[name].mean(0).tolist() for block in per_crop]  # noqa: E731
        entropy = mean("entropy")
        log_windows = [[float(np.log(w)) for w in ws] for ws in self.windows]
        heads = [head for block in self.samples for head in torch.cat(block).unbind(1)]
        time_patches, freq_patches = mean("time"), mean("freq")
        return {
            "windows": self.windows,
            "entropy": entropy,
            "entropy_normalised": [[e / lw if lw > 0 else 0.0 for e, lw in zip(es, lws)]
                                   for es, lws in zip(entropy, log_windows)],
            "distance_time_patches": time_patches,
            "distance_time_ms": scaled(time_patches, patch_size[0] * MS_PER_MEL_FRAME),
            "distance_freq_patches": freq_patches,
            "distance_freq_mel_bins": scaled(freq_patches, patch_size[1]),
            "distance_patches": mean("euclidean"),
            "distance_patches_per_crop": [block["euclidean"].T.tolist() for block in per_crop],  # [block][head][crop]
            "pwcca": pwcca_matrix([head.numpy() for head in heads]).tolist(),
            "pwcca_samples": int(heads[0].shape[0]) if heads else 0,
        }


def scaled(values: list[list[float]], factor: float) -> list[list[float]]:
    return [[v * factor for v in row] for row in values]


# ----------------------------------------------------------------------------- one model

def load_crops(paths: list[str], embedder: embed.Embedder, bad: dict[str, str]) -> torch.Tensor:
    """The 2-s crops of every usable file (C, 200, 80), as embedding cuts them; files that
    cannot be used go into `bad` as {path: reason}."""
    crops = []
    for path in paths:
        try:
            chunks, _ = embedder.chunks(torch.from_numpy(audio.load_audio(path)), what=files.shown(path))
        except audio.AudioError as error:
            bad[path] = error.reason
            continue
        crops.append(chunks.cpu())
    return torch.cat(crops) if crops else torch.empty(0)


def analyse_model(label: str, embedder: embed.Embedder, crops: torch.Tensor, seed: int,
                  batch_size: int, tokens_per_crop: int) -> dict:
    """analysis.json's entry for one model: both stacks' statistics on `crops`."""
    model, cfg = embedder.mae, embedder.mae.cfg
    noise = torch.rand(len(crops), cfg.num_patches, generator=torch.Generator().manual_seed(seed))
    tokens = torch.Generator().manual_seed(seed)
    recorders = {"encoder": StackRecorder(model.num_prefix, cfg.grid, tokens_per_crop, tokens),
                 "decoder": StackRecorder(model.decoder_prefix, cfg.grid, tokens_per_crop, tokens)}
    for start in tqdm(range(0, len(crops), batch_size), desc=label, unit="batch"):
        batch = crops[start: start + batch_size].to(embedder.device)
        for stack, calls in stack_inputs(model, batch, noise[start: start + batch_size].to(batch.device)).items():
            recorders[stack].add(calls)
    return {"source": embedder.source, "config": cfg.to_dict(),
            "stacks": {stack: recorder.summary(cfg.patch_size) for stack, recorder in recorders.items()}}


# ----------------------------------------------------------------------------- figures

def short(label: str) -> str:
    """A model's label in a figure: a file's name without its folders."""
    return Path(label).name


def save_figure(figure: Figure, path: Path) -> None:
    files.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def entropy_figure(models: dict[str, dict]) -> Figure:
    """Fig. 3a: each head's mean entropy against its block, one colour per model; raw and
    normalised by log(window)."""
    figure = Figure(figsize=(12, 7), layout="constrained")
    axes = figure.subplots(len(STACKS), 2, squeeze=False)
    for row, stack in enumerate(STACKS):
        for col, (key, unit) in enumerate([("entropy", "entropy (nats)"),
                                           ("entropy_normalised", "entropy / log(window)")]):
            ax = axes[row, col]
            for m, (label, result) in enumerate(models.items()):
                offset = 0.6 * (m / max(1, len(models) - 1) - 0.5) if len(models) > 1 else 0.0
                for block, values in enumerate(result["stacks"][stack][key]):
                    ax.scatter([block + offset] * len(values), values, s=14, color=f"C{m}",
                               label=short(label) if block == 0 else None)
            ax.set(xlabel=f"{stack} block", ylabel=unit, title=f"{stack}: {unit} per head")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=7)
    return figure


def edge_blocks(depth: int) -> list[int]:
    """The first two and last two blocks (fewer when the stack is shallower)."""
    return sorted({b for b in (0, 1, depth - 2, depth - 1) if 0 <= b < depth})


def distance_figure(models: dict[str, dict]) -> Figure:
    """Fig. 3b: per crop and head mean attention distance (Euclidean, in patches) of the first
    two and last two blocks of each stack (block numbers of the first model); one box per
    model, head means as dots."""
    first = next(iter(models.values()))["stacks"]
    columns = max(len(edge_blocks(len(first[stack]["windows"]))) for stack in STACKS)
    figure = Figure(figsize=(3.2 * columns, 7), layout="constrained")
    axes = figure.subplots(len(STACKS), columns, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)  # a shallower stack leaves some panels empty
    for row, stack in enumerate(STACKS):
        for col, block in enumerate(edge_blocks(len(first[stack]["windows"]))):
            ax = axes[row, col]
            ax.set_visible(True)
            for m, result in enumerate(models.values()):
                blocks = result["stacks"][stack]["distance_patches_per_crop"]
                if block >= len(blocks):  # a shallower model
                    continue
                per_head = blocks[block]
                ax.boxplot([v for head in per_head for v in head], positions=[m], widths=0.6, showfliers=False)
                ax.scatter([m] * len(per_head), [np.mean(head) for head in per_head], s=12, color=f"C{m}", zorder=3)
            ax.set_xticks(range(len(models)), [short(label) for label in models], rotation=30, ha="right", fontsize=7)
            ax.set(title=f"{stack} block {block}", ylabel="mean distance (patches)")
            ax.grid(alpha=0.3)
    return figure


def pwcca_figure(models: dict[str, dict]) -> Figure:
    """Fig. 4: PWCCA between all heads of all blocks, lines between blocks, head windows as ticks."""
    figure = Figure(figsize=(5.5 * len(models), 10), layout="constrained")
    axes = figure.subplots(len(STACKS), len(models), squeeze=False)
    for row, stack in enumerate(STACKS):
        for col, (label, result) in enumerate(models.items()):
            ax, numbers = axes[row, col], result["stacks"][stack]
            image = ax.imshow(np.array(numbers["pwcca"]), vmin=0, vmax=1, cmap="viridis")
            windows = [w for block in numbers["windows"] for w in block]
            heads = len(numbers["windows"][0])
            for edge in range(heads, len(windows), heads):
                ax.axhline(edge - 0.5, color="white", lw=1)
                ax.axvline(edge - 0.5, color="white", lw=1)
            ax.set_xticks(range(len(windows)), windows, fontsize=5, rotation=90)
            ax.set_yticks(range(len(windows)), windows, fontsize=5)
            ax.set(title=f"{short(label)}\n{stack} PWCCA (window per head)")
        figure.colorbar(image, ax=axes[row, -1], shrink=0.8)
    return figure


# ----------------------------------------------------------------------------- command line

def sample_files(audio_dir: str, max_files: int | None, seed: int, bad: dict[str, str]) -> list[str]:
    """The files to analyse: all of them, or a seeded random sample of max_files, sorted."""
    try:
        paths = audio.find_files([audio_dir], skipped=bad)
    except OSError as error:
        raise click.ClickException(f"cannot list the audio: {error}") from None
    if not paths:
        raise click.ClickException(f"no audio files found under {files.shown(audio_dir)}")
    if max_files is not None and len(paths) > max_files:
        paths = sorted(random.Random(seed).sample(paths, max_files))
    return paths


def unique_labels(specs: tuple[str, ...]) -> list[str]:
    """MODEL arguments as labels; a repeated one gets '#2', '#3', ..."""
    labels = []
    for spec in specs:
        label, count = spec, 1
        while label in labels:
            count += 1
            label = f"{spec}#{count}"
        labels.append(label)
    return labels


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="MODEL... AUDIO_DIR")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (new or empty, see --overwrite).")
@click.option("--max-files", type=click.IntRange(min=1), help="Analyse a seeded random sample of this many files.")
@click.option("--seed", default=0, show_default=True, help="Seed of the file sample, the masks, the PWCCA tokens and presets' weights.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="2-s crops per forward pass.")
@click.option("--tokens-per-crop", default=50, show_default=True, type=click.IntRange(min=2),
              help="Random patch tokens of each crop used as PWCCA samples.")
@click.option("--device", type=embed.mae.DeviceChoice(), default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run in --out.")
def main(inputs, out, max_files, seed, batch_size, tokens_per_crop, device, overwrite):
    """Attention entropy, mean attention distance and PWCCA between heads (MW-MAE paper §5) of
    each MODEL (a model file, a bundled model's name or a preset) on 2-s crops of the audio
    under AUDIO_DIR. Writes analysis.json, entropy.png, distance.png and pwcca.png to --out."""
    if len(inputs) < 2:
        raise click.UsageError("give at least one MODEL and then AUDIO_DIR")
    *specs, audio_dir = inputs
    if not os.path.isdir(audio_dir):
        raise click.ClickException(f"AUDIO_DIR {files.shown(audio_dir)}: not a folder (the last argument is the audio)")
    embedders = [embed.load_model_or_fail(spec, seed=seed).to(device) for spec in specs]
    started = time.monotonic()
    bad: dict[str, str] = {}
    paths = sample_files(audio_dir, max_files, seed, bad)
    try:
        with files.OutputFolder(out, own=OUTPUTS, overwrite=overwrite):
            results = {}
            for label, embedder in zip(unique_labels(tuple(specs)), embedders):
                crops = load_crops(paths, embedder, bad)
                if not len(crops):
                    raise click.ClickException(f"no usable audio under {files.shown(audio_dir)}: "
                                               f"{len(bad)} files skipped")
                results[label] = analyse_model(label, embedder, crops, seed, batch_size, tokens_per_crop)
            usable = len(paths) - sum(path in bad for path in paths)
            files.write_json(Path(out) / "analysis.json", {
                "audio_dir": files.shown(audio_dir), "files": usable, "crops": len(crops), "seed": seed,
                "tokens_per_crop": tokens_per_crop, "bad_files": {files.shown(p): r for p, r in sorted(bad.items())},
                "units": "distances: *_patches on the patch grid, *_ms along time, *_mel_bins along frequency; "
                         "entropy in nats; pwcca[i][j] weighted by head i's canonical variates",
                "models": results})
            for name, draw in [("entropy.png", entropy_figure), ("distance.png", distance_figure),
                               ("pwcca.png", pwcca_figure)]:
                save_figure(draw(results), Path(out) / name)
    except (files.OutputError, OSError) as error:
        raise click.ClickException(str(error)) from None
    if bad:
        click.echo(f"{len(bad)} files skipped (listed in analysis.json under bad_files)", err=True)
    click.echo(f"{len(specs)} models, {usable} files, {len(crops)} crops analysed in "
               f"{time.monotonic() - started:.0f} s -> {files.shown(out)}")


if __name__ == "__main__":
    main()
