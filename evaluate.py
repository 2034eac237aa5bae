"""Downstream evaluation of frozen embeddings on HEAR tasks, as hear-eval-kit computes it.

Commands
--------
    python evaluate.py [MODEL] TASK_DIR... [--seeds 10] [--out results/NAME]   (or: evaluate.py run ...)
    (without MODEL, i.e. when the first argument is a folder, the bundled mwmae-tiny-debian)
    python evaluate.py score RESULTS... [--out FILE]
`run` embeds every task with embed.py (cached in OUT/cache/<task>.npz, keyed by the model's
weights hash, config and layout and by every audio file's name, size and times, so changed
weights or audio are embedded again), then trains the probes, one job per (task, seed), in
parallel processes on a CPU (--jobs, default one per core), and writes OUT/results.json and
OUT/results.md as each task completes. Files that cannot be used (unreadable, or a log-mel
that is not finite) are left out, named on stderr and listed in results.json; no probe is
ever trained on a NaN embedding. OUT is locked while `run` works in it (a second process
fails at once) and must be new, empty, or hold only an earlier `run` of the same model
(which is replaced, its embeddings reused); --overwrite replaces `run`'s outputs in any
other folder. `score` compares results.json files (or the folders holding them) with the
normalised overall score s(m). A model literally named "run" or "score" needs `run`
spelled out. Bad options, models and task folders end with one line naming what is wrong.

Task folders are read and checked by hear_tasks.py (hear-preprocess layout), before any
audio is read. Scene tasks: one scene embedding (D,) per file, one probe example per file.
Event tasks (multilabel): timestamp embeddings, one probe example per 40-ms frame, labelled
with every event whose [start, end] holds the frame centre. The scores come from metrics.py:
scene scores on the probe's clip outputs; for event tasks, frame probabilities become events
per file as hear-eval-kit does (its postprocessing is chosen on validation at every check and
the best check's choice is used on test), scored with sed_eval's overall metrics.

Probe (hear-eval-kit's predictor, with the papers' fixed grid)
--------------------------------------------------------------
Linear(D, 1024) -> BatchNorm1d -> Dropout -> ReLU -> Linear(1024, labels), xavier-uniform
weights (gain 1, then the ReLU gain for the output layer), PyTorch's default biases.
Adam, lr 1e-4, batches of 1024 (one full batch when the training set is no larger, shuffled
minibatches otherwise), at most 500 epochs; the primary score is checked on the validation
set every 3 epochs (and at the end of a run shorter than that, e.g. --max-epochs 1), training
stops after 20 checks without a strict gain and the weights of the best check are tested.
Multiclass: cross-entropy, scores on softmax outputs (top1_acc); multilabel: binary
cross-entropy, scores on sigmoid outputs (mAP, macro; events as above).
Splits: trainvaltest uses its splits; k-fold tasks use each sorted fold once as test, the
next one as validation and the rest for training. As in hear-eval-kit, the dropout
(0.1 or 0.25) is chosen on the first split's validation score and reused for the others.
Each seed repeats the whole procedure; a seed's score is the mean over folds, and the report
gives the mean over seeds with a 95% Student-t confidence interval.

Where this departs from hear-eval-kit (which trains through PyTorch Lightning):
- tensors stay on the device and batches are index slices (no DataLoader);
- training batches are reshuffled every epoch (hear-eval-kit's loader keeps the file order
  when it concatenates folds); a last minibatch of one example is merged into the previous
  one, since BatchNorm cannot train on a single example;
- embeddings are not standardised by default, as in hear-eval-kit (its `embedding_norm` is
  Identity); --standardize scales them with the training split's mean and std;
- a check whose score is NaN (an event score when the probe predicts no event at all) is not
  a gain; hear-eval-kit's EarlyStopping (PyTorch Lightning >= 1.6, check_finite on by
  default) ends the training there.

Overall score
-------------
`score` compares models with metrics.overall_scores: s(m) = mean over tasks of
(x_t(m) - min_t) / (max_t - min_t) * 100, x_t the mean primary score, min and max over the
compared models.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import embed
import files
import mae
import metrics
from hear_tasks import Task, data_splits, load_task, task_file_name

CACHE_VERSION = 3


# ----------------------------------------------------------------------------- embeddings

@dataclass
class Embedded:
    """A task's embeddings. Rows are the probe's examples: one per clip for scene tasks, one per
    embedding frame (40 ms) for event tasks."""
    x: np.ndarray  # (rows, D) float32
    row_item: np.ndarray  # (rows,) index into items of each row's file
    timestamps: np.ndarray  # (rows,) frame centre in ms (event tasks; 0 for scene tasks)
    items: list[tuple[str, str]]  # (split, file) of every embedded file, in task order
    bad: dict[str, str]  # path -> reason, for the files left out

    def save(self, path: Path, key: str) -> None:
        embed.save_npz(path, key=np.array(key), x=self.x, row_item=self.row_item, timestamps=self.timestamps,
                       items=np.array([f"{s}/{f}" for s, f in self.items]), bad=np.array(json.dumps(self.bad)))

    @classmethod
    def load(cls, path: Path, key: str | None = None) -> Embedded | None:
        """The cache at `path`; None when its key differs from `key` (if one is given)."""
        with np.load(path) as stored:
            if key is not None and str(stored["key"]) != key:
                return None
            return cls(stored["x"], stored["row_item"], stored["timestamps"],
                       [tuple(item.split("/", 1)) for item in stored["items"]], json.loads(str(stored["bad"])))


NOT_FINITE = "embedding not finite from a finite log-mel (are the model's weights finite?)"


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes and bytes): what its embeddings depend
    on, whichever file or preset the weights came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_identity(model: embed.Embedder) -> dict:
    """The model as results.json records it and embedding caches are keyed by it: where it
    came from, layout, config and the hash of its weights."""
    return {**model.describe(), "weights_sha256": weights_digest(model)}


def same_model(recorded: dict, identity: dict) -> bool:
    """Whether a results.json's model is `identity` (same weights, config and layout; the
    file it was read from may have moved)."""
    normal = json.loads(json.dumps(identity))  # tuples as JSON gives them back
    return all(recorded.get(key) == normal[key] for key in ("weights_sha256", "config", "layout"))


def audio_identity(task: Task) -> str:
    """sha256 of every audio file's path, size, mtime and ctime, without reading the audio: a
    clip replaced, added or removed changes it (ctime also changes when a copy keeps the old
    mtime)."""
    digest = hashlib.sha256(task.embedding_type.encode())
    for item in task.items():
        path = task.audio_path(*item)
        try:
            stat = path.stat()
            state = f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns}"
        except OSError:
            state = "missing"
        digest.update(f"{path.relative_to(task.root)}\0{state}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def task_embeddings(task: Task, model: embed.Embedder, cache: Path | None, memo: dict[str, np.ndarray],
                    identity: dict | None = None) -> Embedded:
    """Embeddings of every readable file of a task: scene embeddings (D,) per file for scene
    tasks, timestamp embeddings (T, D) for event tasks. Files that cannot be used (unreadable,
    not regular files, a log-mel or embedding that is not finite: one NaN row would make a
    probe's weights NaN) are left out and listed with their reason, as embed.embed_files
    reports them.

    cache: an .npz reused when its key matches: the model's identity (weights hash included)
    and the task's audio files (names, sizes, times), else (re)written.
    memo: (kind, digest of the file bytes) -> embedding, shared across tasks so that
    identical audio (e.g. the two mridangam tasks) is embedded once.
    identity: model_identity(model), computed here when not given.
    """
    if cache is not None:
        key = json.dumps({"version": CACHE_VERSION, "model": identity or model_identity(model),
                          "audio": audio_identity(task)}, sort_keys=True)
        if cache.is_file() and (stored := Embedded.load(cache, key)) is not None:
            return stored
    items = task.items()
    paths = {item: task.audio_path(*item) for item in items}
    digests = {item: f"{task.embedding_type}:{file_digest(path)}" if path.is_file() else "" for item, path in paths.items()}
    todo = {}  # digest -> path, first file of each new sound
    for item in items:
        if digests[item] and digests[item] not in memo:
            todo.setdefault(digests[item], str(paths[item]))
    bad_paths = {}  # path -> reason: unreadable, not a regular file, log-mel not finite
    by_path = {path: digest for digest, path in todo.items()}
    embedded = embed.embed_files(tqdm(todo.values(), desc=f"embed {task.name}", unit="file"), model, bad_paths,
                                 timestamps=task.embedding_type == "event")
    for path, embedding in embedded:
        embedding = embedding.float().cpu().numpy()
        if np.isfinite(embedding).all():
            memo[by_path[path]] = embedding
        else:
            bad_paths[path] = NOT_FINITE
    kept = [item for item in items if digests[item] in memo]
    bad = {str(paths[item]): ("missing file" if not digests[item] else
                              bad_paths.get(str(paths[item]), "same bytes as a file left out"))
           for item in items if digests[item] not in memo}
    if not kept:
        path, reason = next(iter(bad.items()))
        raise ValueError(f"{task.name}: none of its {len(items)} audio files can be used "
                         f"(e.g. {files.shown(path)}: {reason})")
    if task.embedding_type == "scene":
        x = np.stack([memo[digests[item]] for item in kept])
        row_item, timestamps = np.arange(len(kept)), np.zeros(len(kept), np.float32)
    else:
        frames = [memo[digests[item]] for item in kept]  # (T_i, D) each
        x = np.concatenate(frames)
        row_item = np.repeat(np.arange(len(kept)), [len(f) for f in frames])
        timestamps = np.concatenate([embed.frame_timestamps(len(f), model.patch_frames).numpy() for f in frames])
    result = Embedded(x.astype(np.float32), row_item, timestamps, kept, bad)
    if cache is not None:
        result.save(cache, key)
    return result


def check_finite(task: Task, emb: Embedded) -> None:
    """Refuse embeddings with NaN or Inf rows, naming their files: one such row is enough to
    make a probe's weights NaN."""
    rows = ~np.isfinite(emb.x).all(axis=1)
    if rows.any():
        names = sorted({"/".join(emb.items[i]) for i in np.unique(emb.row_item[rows])})
        raise ValueError(f"{task.name}: embeddings not finite for {len(names)} file(s), not training on them: "
                         f"{', '.join(map(files.shown, names[:5]))}{', ...' if len(names) > 5 else ''}")


# ----------------------------------------------------------------------------- probe

@dataclass
class ProbeConfig:
    hidden: int = 1024
    lr: float = 1e-4
    batch_size: int = 1024
    max_epochs: int = 500
    check_every: int = 3  # epochs between validation checks
    patience: int = 20  # checks without a gain before stopping
    dropouts: tuple[float, ...] = (0.1, 0.25)
    standardize: bool = False


def make_probe(in_dim: int, n_labels: int, dropout: float, hidden: int = 1024) -> nn.Sequential:
    """hear-eval-kit's one-hidden-layer predictor with xavier-uniform weights."""
    first, last = nn.Linear(in_dim, hidden), nn.Linear(hidden, n_labels)
    nn.init.xavier_uniform_(first.weight, gain=nn.init.calculate_gain("linear"))
    nn.init.xavier_uniform_(last.weight, gain=nn.init.calculate_gain("relu"))
    return nn.Sequential(first, nn.BatchNorm1d(hidden), nn.Dropout(dropout), nn.ReLU(), last)


@dataclass
class Split:
    x: torch.Tensor  # (N, D) on the device
    y: torch.Tensor  # (N, labels) multi-hot float


def file_runs(row_item: np.ndarray) -> list[np.ndarray]:
    """Positions of each file's rows in `row_item`, file by file (a file's rows are consecutive)."""
    return np.split(np.arange(len(row_item)), np.flatnonzero(np.diff(row_item)) + 1)


class SceneScorer:
    """The task's scores of a split's clip predictions."""

    def __init__(self, task: Task, y: np.ndarray):
        self.names, self.y = task.metadata["evaluation"], y

    def validate(self, probs: np.ndarray) -> tuple[float, None]:
        """(primary score, postprocessing: none for scenes)."""
        return metrics.SCORES[self.names[0]](probs, self.y), None

    def scores(self, probs: np.ndarray, postprocessing: None = None) -> dict[str, float]:
        return {name: metrics.SCORES[name](probs, self.y) for name in self.names}


class EventScorer:
    """The task's scores of a split's frame predictions, turned into events file by file."""

    def __init__(self, task: Task, emb: Embedded, rows: np.ndarray):
        self.names, self.labels = task.metadata["evaluation"], task.labels
        files, stamps = emb.row_item[rows], emb.timestamps[rows]
        self.file_rows = file_runs(files)  # positions in the split
        self.timestamps = [stamps[r] for r in self.file_rows]
        self.refs = [task.events(*emb.items[files[r[0]]]) for r in self.file_rows]

    def events(self, probs: np.ndarray, postprocessing: dict) -> list[list[dict]]:
        return [metrics.frames_to_events(probs[r], t, self.labels, **postprocessing)
                for r, t in zip(self.file_rows, self.timestamps)]

    def validate(self, probs: np.ndarray) -> tuple[float, dict]:
        """(primary score, postprocessing) with the postprocessing of the grid that scores best
        (NaN scores last; on ties the later grid entry, as hear-eval-kit's reverse sort)."""
        scored = [(metrics.event_score(self.names[0], self.refs, self.events(probs, post), self.labels), post)
                  for post in metrics.POSTPROCESSING_GRID]
        value, post = max(reversed(scored), key=lambda sp: -math.inf if math.isnan(sp[0]) else sp[0])
        return value, post

    def scores(self, probs: np.ndarray, postprocessing: dict) -> dict[str, float]:
        estimated = self.events(probs, postprocessing)
        return {name: metrics.event_score(name, self.refs, estimated, self.labels) for name in self.names}


@dataclass
class TrainedProbe:
    probe: nn.Module  # holding the weights of the best check
    valid_score: float
    epoch: int  # epoch of the best check
    postprocessing: dict | None  # event tasks: the postprocessing chosen at the best check


def minibatches(n: int, batch_size: int, device: torch.device) -> list[torch.Tensor | slice]:
    """One epoch: the whole set when it fits in a batch, else shuffled index batches (a last
    batch of a single example is merged into the one before: BatchNorm needs two)."""
    if n <= batch_size:
        return [slice(None)]
    parts = list(torch.randperm(n, device=device).split(batch_size))
    if len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


@torch.no_grad()
def predict(probe: nn.Module, x: torch.Tensor, prediction_type: str) -> np.ndarray:
    """Class probabilities (softmax or sigmoid) of the probe in eval mode."""
    probe.eval()
    logits = probe(x)
    probs = logits.softmax(-1) if prediction_type == "multiclass" else logits.sigmoid()
    return probs.float().cpu().numpy()


def is_check(epoch: int, cfg: ProbeConfig) -> bool:
    """Whether the probe is validated after `epoch`: every check_every epochs as hear-eval-kit,
    and at the end of a run shorter than one check interval, which would otherwise have no
    check to take weights from."""
    return epoch % cfg.check_every == 0 or epoch == cfg.max_epochs < cfg.check_every


def train_probe(train: Split, valid: Split, prediction_type: str, scorer: SceneScorer | EventScorer,
                dropout: float, seed: int, cfg: ProbeConfig) -> TrainedProbe:
    """Train one probe with early stopping on the primary validation score; keeps the best check."""
    torch.manual_seed(seed)
    probe = make_probe(train.x.shape[1], train.y.shape[1], dropout, cfg.hidden).to(train.x.device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=cfg.lr, fused=True)
    labels = train.y.argmax(1)
    best, best_state, best_epoch, best_post, bad_checks = -math.inf, None, 0, None, 0
    for epoch in range(1, cfg.max_epochs + 1):
        probe.train()
        for idx in minibatches(len(train.x), cfg.batch_size, train.x.device):
            logits = probe(train.x[idx])
            if prediction_type == "multiclass":
                loss = F.cross_entropy(logits, labels[idx])
            else:
                loss = F.binary_cross_entropy_with_logits(logits, train.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not is_check(epoch, cfg):
            continue
        value, postprocessing = scorer.validate(predict(probe, valid.x, prediction_type))
        if value > best:  # a NaN score is never a gain
            best, best_epoch, best_post, bad_checks = value, epoch, postprocessing, 0
            best_state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
        else:
            bad_checks += 1
            if bad_checks >= cfg.patience:
                break
    if best_state is None:
        raise ValueError(f"no validation check gave a score: max_epochs {cfg.max_epochs}, check_every "
                         f"{cfg.check_every}, last score {value}")
    probe.load_state_dict(best_state)
    return TrainedProbe(probe, best, best_epoch, best_post)


def row_targets(task: Task, emb: Embedded) -> np.ndarray:
    """Targets (rows, labels) of the probe's examples: clip labels, or frame labels from events."""
    if task.embedding_type == "scene":
        return task.targets(emb.items)[emb.row_item]
    return np.concatenate([task.frame_targets(emb.items[emb.row_item[r[0]]], emb.timestamps[r])
                           for r in file_runs(emb.row_item)])


def evaluate_task(task: Task, emb: Embedded, seed: int, cfg: ProbeConfig, device: str | torch.device = "cpu") -> dict:
    """One seed of hear-eval-kit's procedure on a task: dropout chosen on the first split,
    one probe per split, test scores per split and their mean over folds."""
    check_finite(task, emb)
    x_all = torch.from_numpy(emb.x).to(device)
    y_all = torch.from_numpy(row_targets(task, emb)).to(device)
    split_of_row = np.array([split for split, _ in emb.items])[emb.row_item]

    def subset(names: list[str], stats: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Split, np.ndarray]:
        rows = np.flatnonzero(np.isin(split_of_row, names))
        if len(rows) == 0:
            raise ValueError(f"{task.name}: no examples in split(s) {names}")
        idx = torch.from_numpy(rows).to(device)
        x = x_all[idx] if stats is None else (x_all[idx] - stats[0]) / stats[1]
        return Split(x, y_all[idx]), rows

    def scorer(split: Split, rows: np.ndarray) -> SceneScorer | EventScorer:
        return SceneScorer(task, split.y.cpu().numpy()) if task.embedding_type == "scene" else EventScorer(task, emb, rows)

    def prepare(split: dict) -> tuple[Split, tuple[Split, np.ndarray], tuple[Split, np.ndarray]]:
        train, _ = subset(split["train"], None)
        stats = (train.x.mean(0), train.x.std(0) + 1e-8) if cfg.standardize else None
        if stats is not None:
            train = Split((train.x - stats[0]) / stats[1], train.y)
        return train, subset(split["valid"], stats), subset(split["test"], stats)

    start = time.perf_counter()
    splits = data_splits(task.metadata)
    folds, dropout = [], None
    for i, split in enumerate(splits):
        train, (valid, valid_rows), (test, test_rows) = prepare(split)
        valid_scorer = scorer(valid, valid_rows)
        choices = list(enumerate(cfg.dropouts)) if dropout is None else [(cfg.dropouts.index(dropout), dropout)]
        trained = [(train_probe(train, valid, task.prediction_type, valid_scorer, p,
                                seed * 1000 + i * 10 + j, cfg), p) for j, p in choices]
        best, dropout = max(trained, key=lambda tp: tp[0].valid_score)  # first one on ties
        probs = predict(best.probe, test.x, task.prediction_type)
        folds.append({"test": split["test"], "valid_score": best.valid_score, "epoch": best.epoch,
                      "postprocessing": best.postprocessing,
                      "scores": scorer(test, test_rows).scores(probs, best.postprocessing)})
    return {"seed": seed, "dropout": dropout, "folds": folds, "seconds": time.perf_counter() - start,
            "scores": {name: float(np.mean([f["scores"][name] for f in folds]))
                       for name in task.metadata["evaluation"]}}


# ----------------------------------------------------------------------------- probes in parallel

def cpu_cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def evaluate_cached(task: Task, cache: Path, seed: int, cfg: ProbeConfig, device: str) -> dict:
    """evaluate_task on the embeddings that task_embeddings cached: a probe process reads the
    file instead of receiving the arrays through a pipe."""
    return evaluate_task(task, Embedded.load(cache), seed, cfg, device)


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_probes(jobs: list[tuple], workers: int, threads: int) -> Iterator[tuple[int, dict]]:
    """evaluate_cached(*job) for every job, yielding (job index, result) as they finish.

    workers > 1: in that many processes of `threads` torch threads each. A probe is a chain of
    small dependent steps (1024-row matrix products, elementwise ops on 1024 x 1024), which
    several threads share poorly; independent (task, seed) jobs in separate processes keep
    every core busy instead."""
    if workers <= 1:
        for index, job in enumerate(jobs):
            yield index, evaluate_cached(*job)
        return
    context = multiprocessing.get_context("spawn")  # forking a process whose torch threads started is unsafe
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(evaluate_cached, *job): index for index, job in enumerate(jobs)}
        for future in as_completed(futures):
            yield futures[future], future.result()


def summarize(runs: list[dict], score_names: list[str]) -> dict:
    """Per score: mean over seeds, 95% CI half-width, std and the per-seed values."""
    summary = {}
    for name in score_names:
        values = [run["scores"][name] for run in runs]
        mean, ci = metrics.mean_ci(values)
        summary[name] = {"mean": mean, "ci95": ci, "std": float(np.std(values, ddof=1)) if len(values) > 1
                         else math.nan, "per_seed": values}
    return summary


# ----------------------------------------------------------------------------- reports

def counted(n: int, noun: str, plural: str = "") -> str:
    """'1 seed', '2 seeds', '1 process', '4 processes'."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def mean_ci_text(score: dict) -> str:
    """A score's mean ± 95% CI in %, as the console and results.md both show it ("± n/a" for
    a single seed, which has no interval)."""
    return f"{percent(score['mean'])} ± {percent(score['ci95'])}"


def results_markdown(results: dict) -> str:
    lines = [f"Model: {results['model_arg']} ({results['model']['source']}, layout {results['model']['layout']}); "
             f"{counted(len(results['seeds']), 'seed')}; scores in %, mean ± 95% CI over seeds.", "",
             "| task | score | mean ± 95% CI | dropout per seed | embedding s | probe s (all seeds) |",
             "|---|---|---|---|---|---|"]
    for name, task in results["tasks"].items():
        dropouts = ", ".join(str(run["dropout"]) for run in task["runs"])
        lines.append(f"| {name} | {task['primary']} | {mean_ci_text(task['scores'][task['primary']])} | {dropouts} | "
                     f"{task['embedding_s']:.0f} | {task['probe_s']:.0f} |")
    if "probe_wall_s" in results:
        embedding_s = sum(task["embedding_s"] for task in results["tasks"].values())
        lines += ["", f"Wall time: embeddings {embedding_s / 60:.1f} min, probes {results['probe_wall_s'] / 60:.1f} min "
                      f"({counted(results['probe_processes'], 'process', 'processes')} x "
                      f"{counted(results['probe_threads'], 'thread')})."]
    return "\n".join(lines) + "\n"


def score_markdown(table: dict[str, dict[str, float]], overall: dict[str, float]) -> str:
    tasks = sorted(set.intersection(*(set(s) for s in table.values())))
    lines = ["| model | " + " | ".join(tasks) + " | s(m) |", "|---" * (len(tasks) + 2) + "|"]
    for model, scores in table.items():
        s = overall[model]
        cells = [percent(scores[t]) for t in tasks] + ["n/a" if math.isnan(s) else f"{s:.1f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line

OUTPUTS = ("results.json", "results.md", "cache")  # what `run` writes in --out


def holds_own_results(out: Path, identity: dict) -> bool:
    """Whether `out` holds only what `run` writes, with results (if any) of the same model: a
    rerun there replaces the results and reuses the cached embeddings."""
    if not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()
             if p.name != files.LOCK_NAME and not (p.name.startswith(".") and p.name.endswith(files.TEMP_SUFFIX))}
    if not names <= set(OUTPUTS):
        return False
    if "results.json" not in names:
        return True
    try:
        recorded = json.loads(files.read_text(out / "results.json"))["model"]
        return same_model(recorded, identity)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class DefaultGroup(click.Group):
    """A click group whose first word may be left out: `evaluate.py MODEL TASKS...` means
    `evaluate.py run MODEL TASKS...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup)
def main():
    """HEAR downstream evaluation: `run` (the default) and `score`."""


def load_model(model_path: str, layout: str, seed: int, batch_size: int, device: str,
               compiled: bool = False) -> embed.Embedder:
    """embed.load_model with one-line errors, and a note when MODEL names a preset: its weights
    are a random initialisation."""
    if model_path in mae.PRESETS:
        click.echo(f"{model_path} is a preset name: evaluating its random initialisation (seed {seed}), "
                   "not pretrained weights", err=True)
    try:
        model = embed.load_model(model_path, layout=layout, seed=seed, batch_size=batch_size,
                                 compiled=compiled)
    except (ValueError, OSError) as error:  # checkpoints.CheckpointError is a ValueError
        raise click.ClickException(str(error)) from error
    return model.to(device)


def load_tasks(task_dirs: tuple[str, ...]) -> list[Task]:
    for path in task_dirs:
        if not Path(path).is_dir():
            click.echo(f"skipping {files.shown(path)}: not a folder", err=True)
    try:
        tasks = [load_task(d) for d in task_dirs if Path(d).is_dir()]
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    if not tasks:
        raise click.ClickException("no task folders given")
    if len({task.name for task in tasks}) < len(tasks):
        raise click.ClickException("two task folders have the same task_name")
    return tasks


def embed_tasks(tasks: list[Task], model: embed.Embedder, identity: dict, out: Path) -> dict[str, dict]:
    """Embeddings of every task, cached in OUT/cache (identical audio is embedded once); the
    files left out are named on stderr."""
    memo: dict[str, np.ndarray] = {}
    embedded = {}
    for task in tasks:
        start = time.perf_counter()
        cache = out / "cache" / f"{task_file_name(task.name)}.npz"
        try:
            emb = task_embeddings(task, model, cache, memo, identity)
        except ValueError as error:  # no readable audio at all
            raise click.ClickException(str(error)) from error
        for path, reason in list(emb.bad.items())[:10]:
            click.echo(f"{task.name}: left out {files.shown(path)}: {reason}", err=True)
        if len(emb.bad) > 10:
            click.echo(f"{task.name}: {counted(len(emb.bad) - 10, 'more file')} left out (all listed in results.json)", err=True)
        embedded[task.name] = {"cache": cache, "examples": len(emb.items), "frames": len(emb.x),
                               "bad_files": emb.bad, "embedding_s": time.perf_counter() - start}
    return embedded


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="[MODEL] TASK_DIR...", callback=embed.model_and_folders)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: results/<model name>].")
@click.option("--overwrite", is_flag=True,
              help="Replace evaluate's outputs in an --out that holds other work.")
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True, help="Probe seeds 0..N-1.")
@click.option("--device", type=mae.DeviceChoice(), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="2-s chunks per encoder forward pass.")
@click.option("--layout", type=click.Choice(embed.LAYOUTS), default="time", show_default=True)
@click.option("--seed", "model_seed", default=0, show_default=True, help="Seed of a preset's random init.")
@click.option("--max-epochs", type=click.IntRange(min=1), default=500, show_default=True,
              help="Probe epoch limit (500 as HEAR).")
@click.option("--standardize/--no-standardize", default=False, show_default=True,
              help="Scale embeddings with training-split statistics (hear-eval-kit does not).")
@click.option("--jobs", "n_jobs", type=click.IntRange(min=1), default=None,
              help="Probe processes [default: one per CPU core on cpu, 1 on cuda].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads per process [default: embedding: torch's choice; probes: cores / jobs].")
@click.option("--compile", "compiled", is_flag=True,
              help="Compile the encoder forward with torch.compile (cpu, cuda) for embedding.")
def run(inputs, out, overwrite, seeds, device, batch_size, layout, model_seed, max_epochs,
        standardize, n_jobs, threads, compiled):
    """Evaluate MODEL (a model file, a bundled model's name or a preset name) on the HEAR task
    folders TASK_DIR....

    MODEL is optional: when the first argument is an existing folder it is a task folder (a
    model is never a folder) and the bundled pretrained MW-MAE (mwmae-tiny-debian) is evaluated.
    """
    model_arg, task_dirs = inputs
    model_path = model_arg or embed.DEFAULT_MODEL
    if threads:
        torch.set_num_threads(threads)
    tasks = load_tasks(task_dirs)
    out = Path(out or Path("results") / Path(model_path).stem)
    mae.check_compile_device(compiled, device)
    device = str(device)  # probe processes compare it with "cpu"
    model = load_model(model_path, layout, model_seed, batch_size, device, compiled)
    if model_arg is None:
        click.echo(embed.default_model_note(), err=True)
    identity = model_identity(model)
    try:
        output = files.OutputFolder(out, own=OUTPUTS, resumable=holds_own_results(out, identity), overwrite=overwrite)
    except files.OutputError as error:
        raise click.ClickException(str(error)) from error
    with output:
        cfg = ProbeConfig(max_epochs=max_epochs, standardize=standardize)
        results = {"model_arg": model_path, "model": identity, "probe": dataclasses.asdict(cfg),
                   "seeds": list(range(seeds)), "tasks": {}}
        embedded = embed_tasks(tasks, model, identity, out)
        del model
        run_all_probes(tasks, embedded, results, out, cfg, device, n_jobs, threads)
    click.echo(results_markdown(results))
    click.echo(f"written: {files.shown(out / 'results.json')}, {files.shown(out / 'results.md')}")


def run_all_probes(tasks: list[Task], embedded: dict[str, dict], results: dict, out: Path, cfg: ProbeConfig,
                   device: str, n_jobs: int | None, threads: int | None) -> None:
    """Probes: one job per (task, seed), in parallel processes on a CPU; results.json and
    results.md are rewritten as each task completes."""
    seeds = len(results["seeds"])
    jobs = [(task, embedded[task.name]["cache"], seed, cfg, device) for task in tasks for seed in range(seeds)]
    workers = n_jobs or (min(cpu_cores(), len(jobs)) if device == "cpu" else 1)
    probe_threads = threads or max(1, cpu_cores() // workers)
    start, done = time.perf_counter(), {task.name: [] for task in tasks}
    probes = run_probes(jobs, workers, probe_threads)
    try:
        for index, run_result in tqdm(probes, total=len(jobs), desc=f"probes ({counted(workers, 'process', 'processes')})", unit="seed"):
            task = jobs[index][0]
            done[task.name].append(run_result)
            if len(done[task.name]) == seeds:
                report_task(results, task, embedded[task.name], sorted(done[task.name], key=lambda r: r["seed"]))
                results["tasks"] = {t.name: results["tasks"][t.name] for t in tasks if t.name in results["tasks"]}
                write_results(out, results)
    except ValueError as error:  # e.g. a split left without readable files; finished tasks are saved
        raise click.ClickException(str(error)) from error
    results["probe_wall_s"] = time.perf_counter() - start
    results["probe_processes"], results["probe_threads"] = workers, probe_threads
    write_results(out, results)


def write_results(out: Path, results: dict) -> None:
    files.write_json(out / "results.json", results)
    files.write_text(out / "results.md", results_markdown(results))


def report_task(results: dict, task: Task, embedded: dict, runs: list[dict]) -> None:
    """Add a task's summary over seeds to `results` and print its line."""
    entry = {"task_dir": str(task.root), "primary": task.primary_score, "examples": embedded["examples"],
             "frames": embedded["frames"],
             "bad_files": embedded["bad_files"], "scores": summarize(runs, task.metadata["evaluation"]),
             "runs": runs, "embedding_s": embedded["embedding_s"], "probe_s": sum(r["seconds"] for r in runs)}
    results["tasks"][task.name] = entry
    primary = entry["scores"][task.primary_score]
    tqdm.write(f"{task.name}: {task.primary_score} {mean_ci_text(primary)} "
               f"({counted(entry['examples'], 'example')}, {len(entry['bad_files'])} left out; embedding "
               f"{entry['embedding_s']:.0f} s, probes {entry['probe_s']:.0f} s of process time)")


def read_results(path: str) -> tuple[str, dict]:
    """(model name = the results folder's name, results) from results.json or its folder."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise click.ClickException(f"{files.shown(path)}: no results.json")
    try:
        return file.parent.name, json.loads(files.read_text(file))
    except (OSError, ValueError) as error:
        raise click.ClickException(f"{files.shown(file)}: not a readable results.json ({error})") from error


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the table here.")
def score(results, out):
    """Compare RESULTS (results.json files or their folders) with the overall score s(m)."""
    table = {}
    for path in results:
        name, result = read_results(path)
        if name in table:
            raise click.ClickException(f"two results are named {name!r}: give results from distinct folders")
        table[name] = {task: r["scores"][r["primary"]]["mean"] for task, r in result["tasks"].items()}
    common = set.intersection(*(set(s) for s in table.values()))
    for name, scores in table.items():
        if set(scores) - common:
            click.echo(f"{name}: tasks not in every result, left out: {', '.join(sorted(set(scores) - common))}", err=True)
    text = score_markdown(table, metrics.overall_scores(table))
    click.echo(text)
    if out:
        files.write_text(Path(out), text)


if __name__ == "__main__":
    main()
