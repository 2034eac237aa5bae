"""Fine-tune a pretrained encoder on a labelled task, or train a linear probe on it (paper Table 2).

    python finetune.py MODEL DATA --out DIR                 # full fine-tuning
    python finetune.py MODEL DATA --out DIR --linear        # linear probe: frozen encoder
    python finetune.py MODEL DATA --out DIR --resume        # continue exactly where it stopped
    torchrun --nproc_per_node 4 finetune.py MODEL DATA ...  # several GPUs (DDP)

MODEL is a model file (checkpoints.load_pretrained), a bundled model's name (mwmae-tiny-debian,
...) or a preset name (a random initialisation, seed 0, said on stderr). DATA is a HEAR task
folder (scene tasks, multiclass or multilabel; k-fold or train/valid/test, read by
hear_tasks.py) or a labelled folder with one subfolder of audio per class, split into 5 folds
by a seeded shuffle of each class's files (fold i takes every 5th file from position i).

Model: the MAE encoder without masking (MAE.forward_features, as embed.py uses it), its frame
embeddings mean-pooled over the frames that come from the audio, then one linear layer.
--linear freezes the encoder (eval mode, no gradients, not in the optimizer) and standardises
the pooled features with a BatchNorm without affine parameters (MAE's linear probe); otherwise
every encoder parameter trains except, with --freeze-blocks K, the patch embedding and the
first K blocks.

Input: the log-mel chunks the embeddings see, cut by embed.Embedder.chunks itself (whole-clip
standardisation, the last chunk reflect-padded). Training: a random 2-s crop per
clip per step (clips up to 2 s are taken whole), SpecAugment (one time and one frequency mask,
filled with 0, the clip's mean), mixup of each batch with its reverse (lambda ~ Beta(a, a)),
label smoothing (multiclass, softmax cross-entropy) or BCE (multilabel), optional balanced
sampling (clip weight = sum over its labels of 1 / label count). Test: every 2-s chunk of the
whole clip, the chunks' logits averaged. AdamW, warm-up then cosine (training.learning_rate),
layer-wise lr decay: block i (0-based) of a depth-d encoder trains at lr * decay^(d - i), the
patch embedding at lr * decay^(d + 1), the final norm and the head at lr.

Splits: as hear-eval-kit (hear_tasks.data_splits): each k-fold test fold once with the next as
validation and the others as training data; trainvaltest as given. The validation split is not
trained on and not used for model selection (a fixed number of epochs). Each (fold, seed) job
starts from MODEL; a seed's score is the mean over its folds; results give the mean and 95% CI
over seeds (evaluate.summarize), in results.json as evaluate.py writes it, so that
`python evaluate.py score` ranks fine-tuned and frozen-probe results together.

Exactness: the clips of a step, their crops, masks and mixup depend only on (seed, fold, step),
and every process builds the same global batch and takes its own rows, so a resumed job
continues bit for bit and fine-tuning with N processes computes what one process does with
the same global batch (tested with 2 gloo processes). --linear under DDP: SyncBatchNorm on
CUDA; on CPU (gloo, no SyncBatchNorm) each process normalises with its own rows' statistics. Outputs in --out: checkpoint.pt (the running job: weights, optimizer,
step, RNG states; atomic; torch.load(weights_only=True)), jobs.json (finished jobs), results.json,
results.md, bad_files.tsv (clips that could not be read, skipped). SIGINT/SIGTERM: checkpoint,
exit 130/143; the same command with --resume continues (finished jobs are kept; --seeds and
--folds may grow, any other change is refused).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import audio
import checkpoints
import embed
import evaluate
import files
import mae
import training
from hear_tasks import Task, data_splits, load_task

CHECKPOINT, JOBS, BAD_FILES = "checkpoint.pt", "jobs.json", "bad_files.tsv"
OUTPUTS = (CHECKPOINT, JOBS, "results.json", "results.md", BAD_FILES)
AUGMENT_STREAM = 0x66696E65  # crops, masks and mixup: kept apart from other seeded streams
ORDER_STREAM = 0x6F726465  # the clips of each epoch
SUBSET_STREAM = 0x73756273  # the training clips kept by --max-train-clips
LABELLED_FOLDS = 5


# ----------------------------------------------------------------------------- data

def labelled_folder_task(root: Path) -> Task:
    """A folder with one subfolder of audio per class as a multiclass k-fold Task: each class's
    files (sorted, then shuffled with seed 0) are dealt to LABELLED_FOLDS folds in turn."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{files.shown(root)}: neither a HEAR task folder (no task_metadata.json) "
                         "nor a labelled folder (at least two class subfolders)")
    folds = [f"fold{i:02d}" for i in range(LABELLED_FOLDS)]
    splits = {fold: {} for fold in folds}
    rng, base = random.Random(0), audio.absolute(root)  # find_files gives absolute paths
    for label in classes:
        names = [str(Path(path).relative_to(base)) for path in audio.find_files([root / label])]
        rng.shuffle(names)
        for i, name in enumerate(names):
            splits[folds[i % LABELLED_FOLDS]][name] = [label]
    metadata = dict(task_name=root.name, embedding_type="scene", prediction_type="multiclass",
                    split_mode="new_split_kfold", splits=folds, evaluation=["top1_acc", "mAP"])
    return Task(root, metadata, classes, splits)


def read_task(data: Path) -> tuple[Task, dict[tuple[str, str], Path]]:
    """The task in DATA and the audio file of each (split, file)."""
    if (data / "task_metadata.json").is_file():
        task = load_task(data)
        if task.embedding_type != "scene":
            raise ValueError(f"{task.name}: an event task; finetune.py handles scene tasks")
        return task, {item: task.audio_path(*item) for item in task.items()}
    task = labelled_folder_task(data)
    return task, {(split, file): data / file for split, file in task.items()}


@dataclass
class Clips:
    """The inputs of a set of clips: each clip's normalised log-mel, reflect-padded to whole
    chunks as embed.Embedder.chunks pads it, and how many embedding frames come from audio."""
    x: list[torch.Tensor]  # (C * chunk_frames, 80) per clip
    frames: list[int]  # embedding frames T of each clip (C = ceil(T / frames per chunk))
    y: torch.Tensor  # (clips, labels) multi-hot float


def clip_input(wave: torch.Tensor, embedder: embed.Embedder, what: str) -> tuple[torch.Tensor, int]:
    """(samples,) -> (normalised log-mel (C * 200, 80), T embedding frames): exactly the chunks
    embed.Embedder.chunks cuts for embedding, end to end."""
    chunks, kept = embedder.chunks(wave, what)  # (C, 200, 80), frames kept per chunk
    return chunks.reshape(-1, chunks.shape[-1]), sum(kept)


def load_clips(items: list[tuple[str, str]], paths: dict, task: Task, embedder: embed.Embedder,
               bad: dict[str, str]) -> tuple[Clips, list[tuple[str, str]]]:
    """The clips of `items` that can be read, and those items; the others go into `bad`."""
    xs, frames, kept = [], [], []
    for item in tqdm(items, desc="log-mel", unit="clip", leave=False):
        try:
            wave = torch.from_numpy(audio.load_audio(paths[item]))
            x, T = clip_input(wave, embedder, files.shown(paths[item]))
        except audio.AudioError as error:
            bad[str(paths[item])] = error.reason
            continue
        xs.append(x)
        frames.append(T)
        kept.append(item)
    return Clips(xs, frames, torch.from_numpy(task.targets(kept))), kept


def subset(clips: Clips, rows: np.ndarray, what: str) -> Clips:
    """The clips of `rows`; none is a one-line error naming `what`."""
    if len(rows) == 0:
        raise click.ClickException(f"{what}: no readable clips")
    return Clips([clips.x[i] for i in rows], [clips.frames[i] for i in rows], clips.y[torch.from_numpy(rows)])


@dataclass
class Augment:
    time_mask: int  # widest time mask, mel frames (0: none)
    freq_mask: int  # widest frequency mask, mel bins (0: none)
    mixup: float  # Beta(a, a) of the mixup weight (0: no mixup)
    label_smoothing: float  # multiclass only


def random_crop(clips: Clips, i: int, rng: np.random.Generator, cfg: mae.MAEConfig):
    """A 2-s crop of clip i (the whole clip up to 2 s) -> (crop (200, 80), frames kept (50,) bool)."""
    chunk, per_chunk = cfg.input_size[0], cfg.grid[0]
    T = clips.frames[i]
    keep = torch.arange(per_chunk) < T
    if T <= per_chunk:
        return clips.x[i][:chunk], keep
    start = int(rng.integers(0, cfg.patch_size[0] * T - chunk + 1))  # mel frames of the audio
    return clips.x[i][start: start + chunk], keep


def spec_augment(x: torch.Tensor, rng: np.random.Generator, augment: Augment) -> torch.Tensor:
    """One time mask and one frequency mask of random widths (up to the maxima), set to 0."""
    x = x.clone()
    for dim, widest in ((0, augment.time_mask), (1, augment.freq_mask)):
        if widest:
            width = int(rng.integers(0, widest + 1))
            start = int(rng.integers(0, x.shape[dim] - width + 1))
            x.narrow(dim, start, width).zero_()
    return x


def training_batch(clips: Clips, indices: np.ndarray, key: list[int], cfg: mae.MAEConfig,
                   augment: Augment, multiclass: bool):
    """The global batch of one step -> (x (B, 200, 80), keep (B, 50), soft targets (B, labels)).
    Its randomness comes from `key` (seed, fold, step) only."""
    rng = np.random.default_rng([AUGMENT_STREAM, *key])
    crops, keeps = zip(*(random_crop(clips, int(i), rng, cfg) for i in indices))
    x = torch.stack([spec_augment(crop, rng, augment) for crop in crops])
    keep, y = torch.stack(keeps), clips.y[torch.from_numpy(indices)]
    if multiclass and augment.label_smoothing:
        y = y * (1 - augment.label_smoothing) + augment.label_smoothing / y.shape[1]
    if augment.mixup:
        lam = float(rng.beta(augment.mixup, augment.mixup))
        x = lam * x + (1 - lam) * x.flip(0)
        keep = keep | keep.flip(0)
        y = lam * y + (1 - lam) * y.flip(0)
    return x, keep, y


def epoch_order(clips: Clips, seed: int, fold: int, epoch: int, balanced: bool) -> np.ndarray:
    """The clips of an epoch, in order: a permutation, or with `balanced` as many draws with
    replacement, clip weight = sum over its labels of 1 / (clips with that label)."""
    rng = np.random.default_rng([ORDER_STREAM, seed, fold, epoch])
    n = len(clips.x)
    if not balanced:
        return rng.permutation(n)
    y = clips.y.numpy()
    weights = (y / np.maximum(y.sum(0), 1)).sum(1)
    return rng.choice(n, size=n, p=weights / weights.sum())


def training_subset(rows: np.ndarray, fold: int, limit: int | None) -> np.ndarray:
    """At most `limit` of a fold's training rows, drawn at random with a seed of the fold only,
    so that every seed trains on the same clips."""
    if limit is None or len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng([SUBSET_STREAM, fold]).choice(rows, limit, replace=False))


def fold_items(items: list[tuple[str, str]], splits: list[dict], limit: int | None) -> list[dict]:
    """Per test fold, its (split, file) items to train on (at most `limit`, see
    training_subset) and to test on. Only these clips are read, so a small --max-train-clips
    also saves the reading."""
    folds = []
    for fold, split in enumerate(splits):
        parts = {part: [item for item in items if item[0] in split[part]] for part in ("train", "test")}
        keep = training_subset(np.arange(len(parts["train"])), fold, limit)
        folds.append(dict(train=[parts["train"][i] for i in keep], test=parts["test"]))
    return folds


def test_chunks(clips: Clips, cfg: mae.MAEConfig):
    """Every chunk of every clip -> (chunks (N, 200, 80), keep (N, 50), clip index (N,))."""
    chunk, per_chunk = cfg.input_size[0], cfg.grid[0]
    xs, keeps, owners = [], [], []
    for i, (x, T) in enumerate(zip(clips.x, clips.frames)):
        chunks = x.reshape(-1, chunk, x.shape[-1])
        kept = torch.arange(len(chunks) * per_chunk) < T
        xs.append(chunks)
        keeps.append(kept.reshape(len(chunks), per_chunk))
        owners.append(torch.full((len(chunks),), i))
    return torch.cat(xs), torch.cat(keeps), torch.cat(owners)


# ----------------------------------------------------------------------------- model

DECODER = ("decoder_", "mask_token")  # MAE parts the classifier never uses


class Classifier(nn.Module):
    """MAE encoder (no masking) -> frame embeddings mean-pooled over the frames from audio ->
    linear head. `linear`: the encoder is frozen and always in eval mode, and the pooled
    features are standardised by a BatchNorm without affine parameters, as in MAE's linear
    probe (the clips' pooled features differ little from each other: without it a linear
    head learns slowly)."""

    def __init__(self, encoder: mae.MAE, labels: int, linear: bool, freeze_blocks: int = 0):
        super().__init__()
        self.encoder, self.linear = encoder, linear
        size = encoder.cfg.embedding_size
        self.feature_norm = nn.BatchNorm1d(size, affine=False) if linear else nn.Identity()
        self.head = nn.Linear(size, labels)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        for name, param in encoder.named_parameters():
            frozen = freeze_blocks and layer_id(name, encoder.cfg.depth) <= freeze_blocks
            param.requires_grad_(not (linear or frozen or name.startswith(DECODER)))
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.linear:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, 200, 80), keep (B, 50) bool -> logits (B, labels)."""
        with torch.no_grad() if self.linear else contextlib.nullcontext():
            frames = self.encoder.forward_features(x)  # (B, 50, 5 * dim)
        weights = keep.to(frames.dtype)[..., None]
        pooled = (frames * weights).sum(1) / weights.sum(1)
        return self.head(self.feature_norm(pooled))


def layer_id(name: str, depth: int) -> int:
    """Depth of an encoder parameter: 0 patch embedding, CLS and positions; i + 1 block i;
    depth + 1 the final norm (and the head)."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    return depth + 1


def param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters by layer and decay: lr_scale = layer_decay^(depth
    + 1 - layer_id); no weight decay on biases, norms, tokens and position tables."""
    depth, groups = model.encoder.cfg.depth, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name.removeprefix("encoder."), depth)  # the head: depth + 1
        decay = not (param.ndim < 2 or name.rsplit(".", 1)[-1] in mae.NO_DECAY)
        group = groups.setdefault((layer, decay), dict(
            params=[], weight_decay=weight_decay if decay else 0.0,
            lr_scale=layer_decay ** (depth + 1 - layer), layer=layer))
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def soft_loss(logits: torch.Tensor, y: torch.Tensor, multiclass: bool) -> torch.Tensor:
    """Cross-entropy against soft targets (multiclass) or binary cross-entropy (multilabel)."""
    if multiclass:
        return F.cross_entropy(logits, y)
    return F.binary_cross_entropy_with_logits(logits, y)


@torch.no_grad()
def predict(model: Classifier, clips: Clips, batch_size: int, device: torch.device,
            autocast, multiclass: bool) -> np.ndarray:
    """Class probabilities (clips, labels): every chunk of each clip, logits averaged over a
    clip's chunks, then softmax (multiclass) or sigmoid (multilabel). No augmentation."""
    was_training = model.training
    model.eval()
    x, keep, owner = test_chunks(clips, model.encoder.cfg)
    logits = []
    for start in range(0, len(x), batch_size):
        with autocast:
            out = model(x[start: start + batch_size].to(device), keep[start: start + batch_size].to(device))
        logits.append(out.float().cpu())
    logits = torch.cat(logits)
    summed = torch.zeros(len(clips.x), logits.shape[1]).index_add_(0, owner, logits)
    mean = summed / torch.bincount(owner, minlength=len(clips.x))[:, None]
    model.train(was_training)
    return (mean.softmax(-1) if multiclass else mean.sigmoid()).numpy()


# ----------------------------------------------------------------------------- one (fold, seed) job

@dataclass
class Recipe:
    """What a job trains with (a resumed run must give the same)."""
    linear: bool
    epochs: int
    batch_size: int  # per process
    lr: float
    weight_decay: float
    layer_decay: float
    warmup: float  # fraction of the steps
    freeze_blocks: int
    balanced: bool
    augment: Augment


def job_name(fold: int, seed: int) -> str:
    return f"fold{fold}-seed{seed}"


@dataclass
class Context:
    """Where and how jobs run."""
    device: torch.device
    rank: int
    world: int
    out: Path
    save_every: int
    stop_at: int | None  # stop a job after this step (tests of --resume)
    signals: list  # filled by training.stop_requests
    echo: object  # click.echo on rank 0, silent elsewhere


def run_job(encoder: mae.MAE, task: Task, train: Clips, test: Clips, fold: int, seed: int,
            recipe: Recipe, ctx: Context, checkpoint: dict | None) -> dict | None:
    """Train and test one (fold, seed), from its `checkpoint` if there is one. Returns its
    results, or None when stopped (signal or --stop-at) after saving a checkpoint."""
    device, rank, world = ctx.device, ctx.rank, ctx.world
    multiclass = task.prediction_type == "multiclass"
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(encoder), len(task.labels), recipe.linear,
                       recipe.freeze_blocks).to(device)
    optimizer = training.adamw(param_groups(model, recipe.weight_decay, recipe.layer_decay),
                               recipe.lr, (0.9, 0.999), device)
    global_batch = recipe.batch_size * world
    steps_per_epoch = len(train.x) // global_batch
    total = steps_per_epoch * recipe.epochs
    warmup = int(recipe.warmup * total)
    step, losses, epoch_loss = 0, [], torch.zeros((), device=device)  # epoch_loss: summed so far
    start, seconds_before = time.perf_counter(), 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, losses = int(checkpoint["step"]), list(checkpoint["losses"])
        epoch_loss += checkpoint["epoch_loss"]
        seconds_before = checkpoint["seconds"]
        training.set_rng_states(checkpoint["rng"])
        ctx.echo(f"{job_name(fold, seed)}: resuming at step {step} of {total}")
    train_model = model
    if world > 1:  # --linear on CUDA: BatchNorm statistics of the global batch
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type != "cpu")

    def save() -> None:
        if rank == 0:
            training.save_checkpoint(ctx.out / CHECKPOINT, dict(
                job=job_name(fold, seed), model=model.state_dict(), optimizer=optimizer.state_dict(),
                step=step, losses=losses, epoch_loss=epoch_loss, rng=training.rng_states(),
                seconds=seconds_before + time.perf_counter() - start))

    progress = tqdm(total=total, initial=step, desc=job_name(fold, seed), unit="step",
                    disable=rank != 0, leave=False)
    while step < total:
        epoch, position = divmod(step, steps_per_epoch)
        order = epoch_order(train, seed, fold, epoch, recipe.balanced)
        indices = order[position * global_batch: (position + 1) * global_batch]
        x, keep, y = training_batch(train, indices, [seed, fold, step], model.encoder.cfg,
                                    recipe.augment, multiclass)
        rows = slice(rank * recipe.batch_size, (rank + 1) * recipe.batch_size)  # this process's share
        set_learning_rate(optimizer, training.learning_rate(step, recipe.lr, warmup, total))
        with autocast:
            logits = train_model(x[rows].to(device), keep[rows].to(device))
        loss = soft_loss(logits.float(), y[rows].to(device), multiclass)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "xla":
            import torch_xla
            torch_xla.sync()
        step += 1
        progress.update()
        epoch_loss += loss.detach()
        if step % steps_per_epoch == 0:
            losses.append(training.mean_over_processes(epoch_loss) / steps_per_epoch)
            epoch_loss.zero_()
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if not math.isfinite(losses[-1]):
                raise click.ClickException(f"{job_name(fold, seed)}: the training loss is {losses[-1]} "
                                           f"in epoch {len(losses)}: lower --lr or check the data")
        stop = training.any_process(bool(ctx.signals), device) or step == ctx.stop_at
        if stop or step % ctx.save_every == 0 and step < total:
            save()
        if stop and step < total:
            progress.close()
            if dist.is_initialized():
                dist.barrier()  # no process leaves before the checkpoint is written
            return None
    progress.close()
    probs = predict(model, test, recipe.batch_size, device, autocast, multiclass)
    scorer = evaluate.SceneScorer(task, test.y.numpy())
    return {"scores": scorer.scores(probs), "train_loss": losses, "steps": total, "train_clips": len(train.x),
            "seconds": seconds_before + time.perf_counter() - start}


# ----------------------------------------------------------------------------- results

def fold_sets(task: Task, folds: int | None) -> list[dict[str, list[str]]]:
    splits = data_splits(task.metadata)
    return splits[:folds] if folds else splits


def summarize_runs(task: Task, splits: list[dict], seeds: int, jobs: dict) -> list[dict]:
    """evaluate.py's per-seed runs: test scores per fold and their mean over folds."""
    runs = []
    for seed in range(seeds):
        folds = [dict(test=split["test"], **jobs[job_name(i, seed)]) for i, split in enumerate(splits)]
        runs.append({"seed": seed, "folds": folds, "seconds": sum(f["seconds"] for f in folds),
                     "scores": {name: float(np.mean([f["scores"][name] for f in folds]))
                                for name in task.metadata["evaluation"]}})
    return runs


def task_results(task: Task, splits: list[dict], seeds: int, jobs: dict, examples: int,
                 bad: dict[str, str]) -> dict:
    """A task's entry of results.json, as evaluate.py writes it (plus the folds tested)."""
    runs = summarize_runs(task, splits, seeds, jobs)
    return {"task_dir": str(task.root), "primary": task.primary_score, "examples": examples,
            "bad_files": bad, "test_folds": ["+".join(split["test"]) for split in splits],
            "all_folds": len(data_splits(task.metadata)),
            "scores": evaluate.summarize(runs, task.metadata["evaluation"]), "runs": runs}


def results_markdown(results: dict) -> str:
    """The results as a short report (results.json has every number)."""
    ft = results["finetune"]
    mode = "linear probe (frozen encoder)" if ft["linear"] else "full fine-tuning"
    subset = f" on at most {ft['max_train_clips']} training clips" if ft["max_train_clips"] else ""
    lines = [f"Model: {results['model_arg']} ({results['model']['source']}); {mode}, "
             f"{ft['epochs']} epochs{subset}; {evaluate.counted(len(results['seeds']), 'seed')}; "
             "scores in %, mean ± 95% CI over seeds.", "",
             "| task | score | mean ± 95% CI | test folds | per fold (mean over seeds) | train s |",
             "|---|---|---|---|---|---|"]
    for name, task in results["tasks"].items():
        per_fold = ", ".join(evaluate.percent(np.mean([run["folds"][i]["scores"][task["primary"]]
                                                       for run in task["runs"]]))
                             for i in range(len(task["test_folds"])))
        lines.append(f"| {name} | {task['primary']} | {evaluate.mean_ci_text(task['scores'][task['primary']])} "
                     f"| {', '.join(task['test_folds'])} of {task['all_folds']} | {per_fold} | "
                     f"{sum(run['seconds'] for run in task['runs']):.0f} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    files.write_json(out / "results.json", results)
    files.write_text(out / "results.md", results_markdown(results))


# ----------------------------------------------------------------------------- command line

def claim_output(out: Path, resume: bool, overwrite: bool) -> files.OutputFolder:
    """Lock --out (a second process on it fails at once). A folder with a run in it is
    continued with --resume or replaced with --overwrite, never mixed with another run."""
    if resume and overwrite:
        raise click.ClickException("--resume continues the run in --out and --overwrite "
                                   "replaces it: pass one of them")
    has_run = out.is_dir() and ((out / JOBS).is_file() or (out / CHECKPOINT).is_file())
    only_ours = out.is_dir() and files.holds_only(out, OUTPUTS)
    try:
        folder = files.OutputFolder(out, own=OUTPUTS, overwrite=overwrite,
                                    resumable=only_ours and (resume or has_run) and not overwrite)
    except files.OutputError as error:
        raise click.ClickException(str(error)) from None
    if has_run and not (resume or overwrite):
        folder.release()
        raise click.ClickException(f"{files.shown(out)} holds a fine-tuning run: --resume to "
                                   "continue it, --overwrite to replace it")
    return folder


def read_jobs(out: Path, settings: dict, resume: bool) -> dict:
    """Finished jobs of the run in --out (with --resume); refuses other settings."""
    path = out / JOBS
    if not (resume and path.is_file()):
        return {}
    try:
        stored = json.loads(files.read_text(path))
        stored_settings, jobs = stored["settings"], stored["jobs"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise click.ClickException(f"cannot resume: {files.shown(path)} is not readable "
                                   f"({type(error).__name__}); --overwrite starts again") from None
    changed = [f"{key} {value!r} (stored {stored_settings.get(key)!r})" for key, value in settings.items()
               if json.loads(json.dumps(value)) != stored_settings.get(key)]
    if changed:
        raise click.ClickException(f"cannot resume {files.shown(out)} with other settings: "
                                   f"{'; '.join(changed)}. Give the stored values, or --overwrite")
    return jobs


def read_job_checkpoint(out: Path, name: str) -> dict | None:
    """The checkpoint of job `name` in --out, if that is the job it holds."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    try:
        checkpoint = checkpoints.read_torch_file(path)
    except checkpoints.CheckpointError as error:
        raise click.ClickException(f"cannot resume: {error}") from None
    if not isinstance(checkpoint, dict):
        raise click.ClickException(f"cannot resume: {files.shown(path)} is not a fine-tuning checkpoint")
    return checkpoint if checkpoint.get("job") == name else None


def load_encoder(model_arg: str, overrides: tuple[str, ...]) -> tuple[embed.Embedder, dict]:
    """MODEL (file, bundled name or preset: embed.load_model_or_fail says which) as an Embedder,
    whose chunks are the classifier's input and whose model's encoder is fine-tuned, and its
    identity for results.json."""
    if overrides and model_arg not in mae.PRESETS:
        raise click.BadParameter("--set changes a preset's config; MODEL is not a preset",
                                 param_hint="--set")
    if overrides:
        try:
            cfg = mae.preset_config(model_arg, **mae.parse_overrides(overrides))
        except (TypeError, ValueError) as error:
            raise click.BadParameter(str(error), param_hint="--set") from None
        click.echo(f"{model_arg} is a preset: random initialisation (seed 0), not pretrained "
                   "weights", err=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            embedder = embed.Embedder(mae.MAE(cfg), source=f"preset {model_arg} {' '.join(overrides)}, seed 0")
    else:
        embedder = embed.load_model_or_fail(model_arg, seed=0)
    identity = evaluate.model_identity(embedder)
    embedder.mae.requires_grad_(True)
    return embedder, identity


@click.command(context_settings=dict(show_default=True))
@click.argument("model_arg", metavar="MODEL")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (new or empty; see --resume, --overwrite).")
@click.option("--linear", is_flag=True, help="Linear probe: frozen encoder (eval mode, no gradients), "
              "only the linear head trains.")
@click.option("--epochs", default=10, type=click.IntRange(1), help="Epochs per (fold, seed) job.")
@click.option("--batch-size", default=32, type=click.IntRange(1), help="Clips per step and process.")
@click.option("--lr", type=click.FloatRange(0), help="Peak learning rate of the head and the final "
              "norm (blocks: see --layer-decay). [default: 5e-4; --linear 5e-3]")
@click.option("--weight-decay", default=0.05, type=click.FloatRange(0), help="AdamW weight decay "
              "(not on biases, norms, tokens, positions).")
@click.option("--layer-decay", default=0.75, type=click.FloatRange(0, 1, min_open=True),
              help="Layer-wise lr decay: block i of d trains at lr * decay^(d - i).")
@click.option("--warmup", default=0.1, type=click.FloatRange(0, 1, max_open=True),
              help="Linear warm-up, as a fraction of the job's steps; then cosine to 0.")
@click.option("--freeze-blocks", default=0, type=click.IntRange(0),
              help="Freeze the patch embedding and the first K encoder blocks.")
@click.option("--time-mask", default=40, type=click.IntRange(0), help="SpecAugment: widest time mask "
              "in 10-ms frames (0: none).")
@click.option("--freq-mask", default=16, type=click.IntRange(0), help="SpecAugment: widest "
              "frequency mask in mel bins (0: none).")
@click.option("--mixup", default=0.5, type=click.FloatRange(0), help="Mixup: weight ~ Beta(a, a) "
              "(0: none).")
@click.option("--label-smoothing", default=0.1, type=click.FloatRange(0, 1, max_open=True),
              help="Multiclass tasks only.")
@click.option("--balanced", is_flag=True, help="Draw clips with weight = sum over their labels of "
              "1 / label count (for unbalanced multilabel tasks).")
@click.option("--seeds", default=3, type=click.IntRange(1), help="Seeds 0..N-1 (head init, data "
              "order, augmentation).")
@click.option("--folds", type=click.IntRange(1), help="Evaluate only the first N test folds of a "
              "k-fold task, to save time (results.json and results.md name them). [default: all]")
@click.option("--max-train-clips", type=click.IntRange(1), help="Train each job on at most N "
              "clips of its training split, a random subset that is the same for every seed "
              "(low-data fine-tuning, or a CPU budget; results.json records it). [default: all]")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config override of a preset MODEL (random init), e.g. --set depth=1.")
@click.option("--device", default="auto", type=mae.DeviceChoice(),
              help="auto: cuda if available, else xla if torch_xla is installed, else cpu.")
@click.option("--save-every", default=200, type=click.IntRange(1), help="Steps between checkpoints.")
@click.option("--stop-at", type=click.IntRange(1), hidden=True,
              help="Stop a job after this step with a checkpoint (tests of --resume).")
@click.option("--resume", is_flag=True, help="Continue the run in --out (finished jobs are kept).")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run in --out.")
def main(model_arg, data, out, linear, epochs, batch_size, lr, weight_decay, layer_decay, warmup,
         freeze_blocks, time_mask, freq_mask, mixup, label_smoothing, balanced, seeds, folds,
         max_train_clips, overrides, device, save_every, stop_at, resume, overwrite):
    """Fine-tune MODEL (a model file, a bundled model's name or a preset: random init) on DATA,
    a HEAR scene task folder or a folder with one subfolder of audio per class (5 folds by a
    seeded shuffle). --linear trains a linear probe on the frozen encoder instead.

    One job per (test fold, seed); results in OUT/results.json and OUT/results.md (mean and
    95% CI over seeds; `python evaluate.py score` reads them). Ctrl-C or SIGTERM writes a
    checkpoint of the running job: the same command with --resume continues exactly."""
    try:
        task, paths = read_task(data)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    embedder, identity = load_encoder(model_arg, overrides)
    encoder = embedder.mae
    if freeze_blocks > encoder.cfg.depth:
        raise click.BadParameter(f"the encoder has {encoder.cfg.depth} blocks", param_hint="--freeze-blocks")
    recipe = Recipe(linear, epochs, batch_size, lr if lr is not None else 5e-3 if linear else 5e-4,
                    weight_decay, layer_decay, warmup, freeze_blocks, balanced,
                    Augment(time_mask, freq_mask, mixup, label_smoothing))
    splits = fold_sets(task, folds)
    device, rank, world = training.setup_device(device)
    echo = click.echo if rank == 0 else (lambda *args, **kwargs: None)
    settings = dict(model={key: identity[key] for key in ("weights_sha256", "config")},
                    task=task.name, world=world, max_train_clips=max_train_clips,
                    recipe=dataclasses.asdict(recipe))
    with contextlib.ExitStack() as held:
        held.callback(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
        if rank == 0:
            held.enter_context(claim_output(out, resume, overwrite))
        jobs = read_jobs(out, settings, resume)
        bad: dict[str, str] = {}
        fold_parts = fold_items(task.items(), splits, max_train_clips)
        wanted = {item for parts in fold_parts for part in parts.values() for item in part}
        clips, items = load_clips([item for item in task.items() if item in wanted], paths, task,
                                  embedder, bad)
        row_of = {item: row for row, item in enumerate(items)}  # readable clips only
        if rank == 0:
            embed.write_bad_files(out / BAD_FILES, bad)
        for path, reason in list(bad.items())[:10]:
            echo(f"skipped {files.shown(path)}: {reason}", err=True)
        if bad:
            echo(f"{evaluate.counted(len(bad), 'clip')} skipped, listed in {files.shown(out / BAD_FILES)}",
                 err=True)
        todo = [(fold, seed) for seed in range(seeds) for fold in range(len(splits))]
        if rank == 0:  # the settings, so that a resumed run is checked against them
            files.write_json(out / JOBS, dict(settings=settings, jobs=jobs))
        with training.stop_requests() as signals:
            context = Context(device, rank, world, out, save_every, stop_at, signals, echo)
            echo(f"{task.name}: {len(task.labels)} labels, {len(items)} clips, "
                 f"{'linear probe' if linear else 'full fine-tuning'}, {len(todo)} (fold, seed) jobs "
                 f"({len(todo) - sum(job_name(*j) in jobs for j in todo)} to run) on {device} x {world}")
            for fold, seed in todo:
                name = job_name(fold, seed)
                if name in jobs:
                    continue
                rows = {part: np.array([row_of[item] for item in fold_parts[fold][part] if item in row_of],
                                       dtype=np.int64) for part in ("train", "test")}
                train, test = (subset(clips, rows[part], f"{task.name} {part} {'+'.join(splits[fold][part])}")
                               for part in ("train", "test"))
                if len(train.x) < batch_size * world:
                    raise click.ClickException(
                        f"{name}: {len(train.x)} training clips do not fill one batch of "
                        f"{batch_size} x {world} process(es): lower --batch-size")
                checkpoint = read_job_checkpoint(out, name) if resume else None
                result = run_job(encoder, task, train, test, fold, seed, recipe, context, checkpoint)
                if result is None:
                    signum = signals[0] if signals else None
                    echo(f"stopped{f' by {signal.Signals(signum).name}' if signum else ''} in {name}; "
                         f"checkpoint {files.shown(out / CHECKPOINT)}: continue with --resume")
                    if signum:
                        raise SystemExit(128 + signum)
                    return
                jobs[name] = result
                echo(f"{name}: {task.primary_score} {100 * result['scores'][task.primary_score]:.1f} "
                     f"(train loss {result['train_loss'][0]:.3f} -> {result['train_loss'][-1]:.3f}, "
                     f"{result['seconds']:.0f} s)")
                if rank == 0:
                    files.write_json(out / JOBS, dict(settings=settings, jobs=jobs))
                    (out / CHECKPOINT).unlink(missing_ok=True)  # its job is finished
        results = {"model_arg": model_arg, "model": identity,
                   "finetune": dict(settings["recipe"], max_train_clips=max_train_clips),
                   "seeds": list(range(seeds)),
                   "tasks": {task.name: task_results(task, splits, seeds, jobs, len(items), bad)}}
        if rank == 0:
            write_results(out, results)
        echo(results_markdown(results))
        echo(f"written: {files.shown(out / 'results.json')}, {files.shown(out / 'results.md')}")


if __name__ == "__main__":
    main()
