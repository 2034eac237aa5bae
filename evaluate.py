"""Downstream evaluation of frozen embeddings on HEAR tasks, as hear-eval-kit computes it.

Commands
--------
    python evaluate.py MODEL TASK_DIR... [--seeds 10] [--out results/NAME]   (or: evaluate.py run ...)
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

Task folders (hear-preprocess layout)
-------------------------------------
task_metadata.json (task_name, embedding_type, prediction_type, split_mode, splits,
evaluation: primary score first), labelvocabulary.csv (idx,label), <split>.json
({file: [labels]}, or {file: [{"label", "start", "end"} in ms]} for event tasks) and audio in
<sample rate>/<split>/<file> (16000 preferred; any rate is resampled by audio.load_audio).

Scene tasks: one scene embedding (D,) per file, one probe example per file.
Event tasks (multilabel): timestamp embeddings, one probe example per 40-ms frame, labelled
with every event whose [start, end] holds the frame centre. Frame probabilities become events
per file as hear-eval-kit does (median filter of 250 ms, threshold 0.5, runs of active frames
from the first to the last frame's timestamp, runs shorter than 125 or 250 ms dropped: that
choice is made on validation at every check and the best check's choice is used on test),
scored with sed_eval's overall metrics (event_onset_200ms_fms, event_onset_50ms_fms,
event_onset_offset_50ms_20perc_fms: F-measure with optimal one-to-one matching of same-label
events; segment_1s_er: error rate on 1-s segments), reimplemented here and tested against
sed_eval 0.2.1.

Probe (hear-eval-kit's predictor, with the papers' fixed grid)
--------------------------------------------------------------
Linear(D, 1024) -> BatchNorm1d -> Dropout -> ReLU -> Linear(1024, labels), xavier-uniform
weights (gain 1, then the ReLU gain for the output layer), PyTorch's default biases.
Adam, lr 1e-4, batches of 1024 (one full batch when the training set is no larger, shuffled
minibatches otherwise), at most 500 epochs; the primary score is checked on the validation
set every 3 epochs (and at the end of a run shorter than that, e.g. --max-epochs 1), training
stops after 20 checks without a strict gain and the weights of the best check are tested. Multiclass: cross-entropy, scores on softmax outputs (top1_acc);
multilabel: binary cross-entropy, scores on sigmoid outputs (mAP, macro; events as above).
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
s(m) = mean over tasks of (x_t(m) - min_t) / (max_t - min_t) * 100, x_t the mean primary
score, min and max over the compared models; tasks where every model scores the same carry
no information and are left out.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import statistics
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

CACHE_VERSION = 3


# ----------------------------------------------------------------------------- tasks

@dataclass
class Task:
    root: Path
    metadata: dict
    labels: list[str]  # label of each index
    splits: dict[str, dict[str, list[str]]]  # split -> file -> labels

    @property
    def name(self) -> str:
        return self.metadata["task_name"]

    @property
    def embedding_type(self) -> str:
        return self.metadata["embedding_type"]

    @property
    def prediction_type(self) -> str:
        return self.metadata["prediction_type"]

    @property
    def primary_score(self) -> str:
        return self.metadata["evaluation"][0]

    def items(self) -> list[tuple[str, str]]:
        """(split, file) of every example, splits in metadata order, files sorted."""
        return [(split, file) for split in self.metadata["splits"] for file in sorted(self.splits[split])]

    @functools.cached_property
    def audio_dir(self) -> Path:
        return audio_root(self.root)

    def audio_path(self, split: str, file: str) -> Path:
        return self.audio_dir / split / file

    @functools.cached_property
    def label_ids(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def label_index(self, label, where: str) -> int:
        if str(label) not in self.label_ids:
            raise ValueError(f"{where}: label {label!r} is not in labelvocabulary.csv")
        return self.label_ids[str(label)]

    def targets(self, items: list[tuple[str, str]]) -> np.ndarray:
        """Scene tasks: multi-hot (one-hot for multiclass) float32 targets (N, labels)."""
        y = np.zeros((len(items), len(self.labels)), np.float32)
        for row, (split, file) in enumerate(items):
            for label in self.splits[split][file]:
                y[row, self.label_index(label, f"{split}/{file}")] = 1.0
        return y

    def events(self, split: str, file: str) -> list[dict]:
        """Event tasks: the reference events of a file, [{"label", "start", "end"}] in ms."""
        return self.splits[split][file]

    def frame_targets(self, item: tuple[str, str], timestamps: np.ndarray) -> np.ndarray:
        """Event tasks: multi-hot targets (T, labels) of frames centred at `timestamps` (ms): a
        frame carries the label of every event with start <= t <= end (hear-eval-kit's interval
        tree holds [start, end + 0.0001))."""
        y = np.zeros((len(timestamps), len(self.labels)), np.float32)
        for event in self.events(*item):
            active = (timestamps >= event["start"]) & (timestamps < event["end"] + 0.0001)
            y[active, self.label_index(event["label"], "/".join(item))] = 1.0
        return y


def audio_root(task_dir: Path) -> Path:
    """The <sample rate> folder of a task: 16000 if present, else the lowest rate above it,
    else the highest one."""
    rates = sorted(int(p.name) for p in task_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not rates:
        raise ValueError(f"{files.shown(task_dir)}: no audio folder named by its sample rate (e.g. 16000/)")
    above = [r for r in rates if r >= embed.SAMPLE_RATE]
    return task_dir / str(above[0] if above else rates[-1])


def load_task(task_dir: str | Path) -> Task:
    """Read and check a HEAR task folder. Anything malformed raises ValueError naming the file
    and what it should hold, before any audio is read."""
    root = Path(task_dir)
    meta_path = root / "task_metadata.json"
    if not meta_path.is_file():
        raise ValueError(f"{files.shown(root)}: not a HEAR task folder (no task_metadata.json)")
    metadata = read_json(meta_path)
    check_metadata(metadata, meta_path)
    labels = read_label_vocabulary(root / "labelvocabulary.csv")
    splits = {}
    for split in metadata["splits"]:
        split_path = root / f"{split}.json"
        splits[split] = read_json(split_path)
        if not isinstance(splits[split], dict):
            raise ValueError(f"{files.shown(split_path)}: expected an object {{file name: [labels]}}, "
                             f"got {json_kind(splits[split])}")
    task = Task(root, metadata, labels, splits)
    check_labels(task)
    return task


def json_kind(value) -> str:
    """How a JSON value is described in messages: 'a list', 'the number 5', ..."""
    if isinstance(value, (dict, list)):
        return f"a {'list' if isinstance(value, list) else 'object'}"
    return f"{json.dumps(value)[:40]}"


def read_json(path: Path):
    """A task's JSON file; ValueError naming the file when it is missing, not UTF-8 or not JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{files.shown(path)}: missing") from None
    except OSError as error:
        raise ValueError(f"{files.shown(path)}: unreadable ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{files.shown(path)}: not UTF-8 text (byte {error.start}); "
                         "task files must be UTF-8 JSON") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{files.shown(path)}: not valid JSON ({error.msg}, line {error.lineno})") from None


METADATA_TYPES = {"task_name": str, "embedding_type": str, "prediction_type": str, "split_mode": str,
                  "splits": list, "evaluation": list}


def check_metadata(metadata, path: Path) -> None:
    """Refuse task_metadata.json unless it holds the keys evaluation needs, with usable values."""
    where = files.shown(path)
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: expected an object with {', '.join(METADATA_TYPES)}; got {json_kind(metadata)}")
    missing = [key for key in METADATA_TYPES if key not in metadata]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    for key, kind in METADATA_TYPES.items():
        value = metadata[key]
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) and v for v in value)):
            expected = "a list of names" if kind is list else "a string"
            raise ValueError(f"{where}: {key} must be {expected}, got {json_kind(value)}")
    if not metadata["task_name"]:
        raise ValueError(f"{where}: task_name is empty")
    if not metadata["splits"] or len(set(metadata["splits"])) < len(metadata["splits"]):
        raise ValueError(f"{where}: splits must name one or more distinct splits, got {metadata['splits']!r}")
    kind = metadata["embedding_type"]
    if kind not in ("scene", "event"):
        raise ValueError(f"{where}: unknown embedding_type {kind!r} (scene or event)")
    if metadata["prediction_type"] not in ("multiclass", "multilabel"):
        raise ValueError(f"{where}: unknown prediction_type {metadata['prediction_type']!r} (multiclass or multilabel)")
    if kind == "event" and metadata["prediction_type"] != "multilabel":
        raise ValueError(f"{where}: event tasks are multilabel (several events may overlap)")
    known = SCORES if kind == "scene" else EVENT_SCORES
    unknown = [s for s in metadata["evaluation"] if s not in known]
    if not metadata["evaluation"] or unknown:
        raise ValueError(f"{where}: scores {unknown or '(none)'} not supported for {kind} tasks; "
                         f"known: {', '.join(known)}")
    if kind == "event" and not EVENT_SCORES[metadata["evaluation"][0]].maximize:
        raise ValueError(f"{where}: the primary score {metadata['evaluation'][0]} is an error rate; "
                         "early stopping needs a score to maximise first")
    try:
        data_splits(metadata)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def read_label_vocabulary(path: Path) -> list[str]:
    """labelvocabulary.csv: a header idx,label and one row per label, idx 0..n-1 in any order."""
    where = files.shown(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"{where}: missing") from None
    except OSError as error:
        raise ValueError(f"{where}: unreadable ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not UTF-8 text (byte {error.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"idx", "label"} <= set(reader.fieldnames):
        raise ValueError(f"{where}: expected the header idx,label, got {','.join(reader.fieldnames or [])!r}")
    rows = []
    for line, row in enumerate(reader, start=2):
        if row["label"] is None or not re.fullmatch(r"\s*[0-9]+\s*", row["idx"] or ""):
            raise ValueError(f"{where}: line {line}: expected an integer idx and a label, got {row['idx']!r},{row['label']!r}")
        rows.append((int(row["idx"]), row["label"]))
    rows.sort()
    if [i for i, _ in rows] != list(range(len(rows))):
        raise ValueError(f"{where}: indices are not 0..{len(rows) - 1}")
    return [label for _, label in rows]


def check_labels(task: Task) -> None:
    """Refuse labels that are not lists, labels missing from the vocabulary, multiclass files
    without exactly one label and malformed events, before any embedding is computed."""
    for split, labelled in task.splits.items():
        for file, labels in labelled.items():
            where = f"{files.shown(task.root / f'{split}.json')}: {files.shown(file)}"
            if not isinstance(labels, list):
                example = '["dog"]' if task.embedding_type == "scene" else '[{"label": "dog", "start": 0, "end": 500}]'
                raise ValueError(f"{where}: labels must be a list (e.g. {example}), got {json_kind(labels)}")
            if task.embedding_type == "scene":
                if task.prediction_type == "multiclass" and len(labels) != 1:
                    raise ValueError(f"{where}: has {len(labels)} labels in a multiclass task (needs exactly one)")
                for label in labels:
                    task.label_index(label, where)
                continue
            for event in labels:
                if not isinstance(event, dict) or not {"label", "start", "end"} <= set(event):
                    raise ValueError(f"{where}: events need label, start and end (ms), got {event!r}")
                if not all(isinstance(event[t], (int, float)) and not isinstance(event[t], bool) for t in ("start", "end")):
                    raise ValueError(f"{where}: event start and end must be numbers (ms), got {event!r}")
                if not event["start"] <= event["end"]:
                    raise ValueError(f"{where}: an event ends before it starts: {event!r}")
                task.label_index(event["label"], where)


def data_splits(metadata: dict) -> list[dict[str, list[str]]]:
    """hear-eval-kit's splits: trainvaltest as given; k folds (sorted): fold i is the test
    set, fold i + 1 (cyclically) the validation set, the others the training set."""
    mode = metadata["split_mode"]
    if mode == "trainvaltest":
        return [{"train": ["train"], "valid": ["valid"], "test": ["test"]}]
    if mode in ("new_split_kfold", "presplit_kfold"):
        folds = sorted(metadata["splits"])
        if len(folds) < 3:
            raise ValueError(f"{mode} needs at least 3 folds, got {folds}")
        return [{"train": [f for f in folds if f not in (test, valid)], "valid": [valid], "test": [test]}
                for test, valid in zip(folds, folds[1:] + folds[:1])]
    raise ValueError(f"unknown split_mode {mode!r}")


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


# ----------------------------------------------------------------------------- scores

def top1_accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == targets.argmax(1)))


def chroma_accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Pitch accuracy ignoring the octave (classes are semitones)."""
    return float(np.mean(probs.argmax(1) % 12 == targets.argmax(1) % 12))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, highest first
    (sklearn's average_precision_score); 0 for a class without positives."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each threshold
    true_pos = np.cumsum(positive)[last]
    if true_pos[-1] == 0:
        return 0.0
    precision, recall = true_pos / (last + 1), true_pos / true_pos[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(probs: np.ndarray, targets: np.ndarray) -> float:
    """Macro mAP: every class counts the same."""
    return float(np.mean([average_precision(probs[:, c], targets[:, c]) for c in range(targets.shape[1])]))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties
    counting half (the Mann-Whitney statistic with average ranks)."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2  # average 1-based rank of a tie group
    n_pos = positive.sum()
    n_neg = len(scores) - n_pos
    return float((ranks[positive > 0].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _class_aucs(probs: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
    """Per-class AUCs, or None when a class lacks positives or negatives (hear-eval-kit
    scores such a split as NaN)."""
    counts = targets.sum(0)
    if np.any(counts == 0) or np.any(counts == len(targets)):
        return None
    return np.array([roc_auc(probs[:, c], targets[:, c]) for c in range(targets.shape[1])])


def aucroc(probs: np.ndarray, targets: np.ndarray) -> float:
    aucs = _class_aucs(probs, targets)
    return math.nan if aucs is None else float(aucs.mean())


def d_prime(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes of sqrt(2) * Phi^-1(AUC)."""
    aucs = _class_aucs(probs, targets)
    if aucs is None:
        return math.nan
    normal = statistics.NormalDist()
    z = [math.copysign(math.inf, a - 0.5) if a in (0.0, 1.0) else normal.inv_cdf(a) for a in aucs]
    return float(np.mean(z) * math.sqrt(2.0))


SCORES = {  # hear-eval-kit's scene scores; all are maximised
    "top1_acc": top1_accuracy,
    "pitch_acc": top1_accuracy,
    "chroma_acc": chroma_accuracy,
    "mAP": mean_average_precision,
    "d_prime": d_prime,
    "aucroc": aucroc,
}


# ----------------------------------------------------------------------------- event scores
# Event tasks are scored on events, not frames: the probe's frame outputs become events
# (hear-eval-kit's postprocessing), compared with the reference events by sed_eval's overall
# (micro-averaged) metrics. Times are in seconds there, as hear-eval-kit passes them.

@dataclass(frozen=True)
class EventScore:
    kind: str  # "event": F-measure of matched events; "segment": error rate on a time grid
    t_collar: float = 0.2  # s: |onset difference| allowed (and offset, with max(collar, share of length))
    evaluate_offset: bool = False
    percentage_of_length: float = 0.5
    time_resolution: float = 1.0  # s: segment length
    maximize: bool = True


EVENT_SCORES = {  # hear-eval-kit's event scores
    "event_onset_200ms_fms": EventScore("event", t_collar=0.2),
    "event_onset_50ms_fms": EventScore("event", t_collar=0.05),
    "event_onset_offset_50ms_20perc_fms": EventScore("event", t_collar=0.05, evaluate_offset=True,
                                                     percentage_of_length=0.2),
    "segment_1s_er": EventScore("segment", time_resolution=1.0, maximize=False),
}

# hear-eval-kit's postprocessing grid, chosen on validation at every check.
POSTPROCESSING_GRID = ({"median_filter_ms": 250, "min_duration": 125}, {"median_filter_ms": 250, "min_duration": 250})


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """scipy.ndimage.median_filter(x, size=(width, 1)): along time, element width // 2 of each
    sorted window [t - width // 2, t - width // 2 + width), the ends mirrored (d c b a | a b c d)."""
    if width <= 1:
        return x
    left = width // 2
    padded = np.pad(x, ((left, width - 1 - left), (0, 0)), mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=0)  # (T, labels, width)
    return np.sort(windows, axis=-1)[..., width // 2]


def frames_to_events(probs: np.ndarray, timestamps: np.ndarray, labels: list[str], median_filter_ms: float,
                     min_duration: float, threshold: float = 0.5) -> list[dict]:
    """One file's frame probabilities (T, labels) -> events {"label", "start", "end"} in ms:
    median filter over time, threshold, runs of active frames from the first to the last
    frame's timestamp, runs shorter than min_duration dropped."""
    if len(timestamps) > 1:
        probs = median_filter(probs, int(round(median_filter_ms / np.mean(np.diff(timestamps)))))
    events = []
    for c, label in enumerate(labels):
        active = np.flatnonzero(probs[:, c] > threshold)
        for run in np.split(active, np.flatnonzero(np.diff(active) > 1) + 1) if len(active) else []:
            start, end = float(timestamps[run[0]]), float(timestamps[run[-1]])
            if end - start >= min_duration:
                events.append({"label": label, "start": start, "end": end})
    return sorted(events, key=lambda e: e["start"])


def matching_size(hits: np.ndarray) -> int:
    """Size of a maximum matching of a bipartite graph (reference x estimated boolean matrix),
    by augmenting paths (Kuhn): what sed_eval's 'optimal' event matching counts."""
    owner = [-1] * hits.shape[1]  # reference matched to each estimated event

    def augment(ref: int, seen: list[bool]) -> bool:
        for est in np.flatnonzero(hits[ref]):
            if not seen[est]:
                seen[est] = True
                if owner[est] < 0 or augment(owner[est], seen):
                    owner[est] = ref
                    return True
        return False

    return sum(augment(ref, [False] * hits.shape[1]) for ref in range(hits.shape[0]))


def event_counts(ref: list[dict], est: list[dict], score: EventScore) -> tuple[int, int, int]:
    """(true positives, reference events, estimated events) of one file: a hit needs the same
    label and the onset within the collar (and the offset within max(collar, share of the
    reference length) when asked); each event counts at most once."""
    true_pos = 0
    for label in {e["label"] for e in ref} & {e["label"] for e in est}:
        r = [(e["start"] / 1000.0, e["end"] / 1000.0) for e in ref if e["label"] == label]
        s = [(e["start"] / 1000.0, e["end"] / 1000.0) for e in est if e["label"] == label]
        hits = np.array([[abs(r_on - s_on) <= score.t_collar and (
            not score.evaluate_offset or abs(r_off - s_off) <= max(score.t_collar, score.percentage_of_length * (r_off - r_on)))
            for s_on, s_off in s] for r_on, r_off in r], dtype=bool)
        true_pos += matching_size(hits)
    return true_pos, len(ref), len(est)


def segment_counts(ref: list[dict], est: list[dict], labels: list[str], resolution: float) -> np.ndarray:
    """(substitutions, deletions, insertions, reference activity) of one file on a grid of
    `resolution` s: a label is active in every segment its events touch."""
    length = math.ceil(max([e["end"] / 1000.0 for e in ref + est], default=0.0) / resolution)

    def roll(events: list[dict]) -> np.ndarray:
        active = np.zeros((length, len(labels)), bool)
        for e in events:
            on, off = math.floor(e["start"] / 1000.0 / resolution), math.ceil(e["end"] / 1000.0 / resolution)
            active[on:off, labels.index(str(e["label"]))] = True
        return active

    r, s = roll(ref), roll(est)
    n_ref, n_sys, true_pos = r.sum(1), s.sum(1), (r & s).sum(1)
    return np.array([(np.minimum(n_ref, n_sys) - true_pos).sum(), np.maximum(0, n_ref - n_sys).sum(),
                     np.maximum(0, n_sys - n_ref).sum(), n_ref.sum()])


def event_score(name: str, refs: list[list[dict]], ests: list[list[dict]], labels: list[str]) -> float:
    """sed_eval's overall score `name` over files (reference and estimated events per file):
    F-measure from summed counts (NaN without estimated or reference events, as sed_eval),
    or the segment error rate (S + D + I) / N."""
    score = EVENT_SCORES[name]
    if score.kind == "segment":
        subs, dels, ins, n_ref = sum(segment_counts(r, e, labels, score.time_resolution) for r, e in zip(refs, ests))
        eps = np.spacing(1)
        return float(subs / (n_ref + eps) + dels / (n_ref + eps) + ins / (n_ref + eps))
    true_pos, n_ref, n_sys = np.sum([event_counts(r, e, score) for r, e in zip(refs, ests)], axis=0)
    precision = true_pos / n_sys if n_sys else math.nan
    recall = true_pos / n_ref if n_ref else math.nan
    if precision == 0 and recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


# ----------------------------------------------------------------------------- statistics

def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...)), df - 3 powers
        term, series = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        tail = math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0
        return 2 / math.pi * (theta + tail)
    term, series = 1.0, 1.0  # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...), df - 2 powers
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        series += term
    return math.sin(theta) * series


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| < t) = level (e.g. 12.706 for level 0.95, df 1), by bisection."""
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_two_sided(mid, df) < level else (low, mid)
    return (low + high) / 2


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its Student-t confidence interval (NaN for a single value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan
    return mean, t_quantile(level, n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)


def overall_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """s(m) = mean over tasks of (x_t(m) - min_t) / (max_t - min_t) * 100.

    scores: model -> task -> score; only tasks every model has count, and tasks where all
    models tie are left out (no information). NaN when no task is left."""
    tasks = set.intersection(*(set(s) for s in scores.values())) if scores else set()
    spread = {}
    for task in tasks:
        values = [s[task] for s in scores.values()]
        if max(values) > min(values):
            spread[task] = (min(values), max(values))
    return {model: float(np.mean([(s[t] - lo) / (hi - lo) * 100 for t, (lo, hi) in spread.items()]))
            if spread else math.nan for model, s in scores.items()}


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
        return SCORES[self.names[0]](probs, self.y), None

    def scores(self, probs: np.ndarray, postprocessing: None = None) -> dict[str, float]:
        return {name: SCORES[name](probs, self.y) for name in self.names}


class EventScorer:
    """The task's scores of a split's frame predictions, turned into events file by file."""

    def __init__(self, task: Task, emb: Embedded, rows: np.ndarray):
        self.names, self.labels = task.metadata["evaluation"], task.labels
        files, stamps = emb.row_item[rows], emb.timestamps[rows]
        self.file_rows = file_runs(files)  # positions in the split
        self.timestamps = [stamps[r] for r in self.file_rows]
        self.refs = [task.events(*emb.items[files[r[0]]]) for r in self.file_rows]

    def events(self, probs: np.ndarray, postprocessing: dict) -> list[list[dict]]:
        return [frames_to_events(probs[r], t, self.labels, **postprocessing)
                for r, t in zip(self.file_rows, self.timestamps)]

    def validate(self, probs: np.ndarray) -> tuple[float, dict]:
        """(primary score, postprocessing) with the postprocessing of the grid that scores best
        (NaN scores last; on ties the later grid entry, as hear-eval-kit's reverse sort)."""
        scored = [(event_score(self.names[0], self.refs, self.events(probs, post), self.labels), post)
                  for post in POSTPROCESSING_GRID]
        value, post = max(reversed(scored), key=lambda sp: -math.inf if math.isnan(sp[0]) else sp[0])
        return value, post

    def scores(self, probs: np.ndarray, postprocessing: dict) -> dict[str, float]:
        estimated = self.events(probs, postprocessing)
        return {name: event_score(name, self.refs, estimated, self.labels) for name in self.names}


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
        mean, ci = mean_ci(values)
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


def task_file_name(name: str) -> str:
    """A task name as a file name inside --out: only letters, digits, '.', '-' and '_', never
    hidden or a path (a task_name of '../../x' stays inside); a name that had to change gets a
    short hash of the original so that two tasks never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if safe == name:
        return name
    return f"{safe or 'task'}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


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
def cli():
    """HEAR downstream evaluation: `run` (the default) and `score`."""


def load_model(model_path: str, layout: str, seed: int, batch_size: int, device: str) -> embed.Embedder:
    """embed.load_model with one-line errors, and a note when MODEL names a preset: its weights
    are a random initialisation."""
    if model_path in mae.PRESETS:
        click.echo(f"{model_path} is a preset name: evaluating its random initialisation (seed {seed}), "
                   "not pretrained weights", err=True)
    try:
        model = embed.load_model(model_path, layout=layout, seed=seed, batch_size=batch_size)
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


@cli.command()
@click.argument("model_path", metavar="MODEL")
@click.argument("task_dirs", nargs=-1, required=True, type=click.Path(exists=True))
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
def run(model_path, task_dirs, out, overwrite, seeds, device, batch_size, layout, model_seed, max_epochs,
        standardize, n_jobs, threads):
    """Evaluate MODEL (a checkpoint or a preset name) on the HEAR task folders TASK_DIR...."""
    if threads:
        torch.set_num_threads(threads)
    tasks = load_tasks(task_dirs)
    out = Path(out or Path("results") / Path(model_path).stem)
    device = str(device)  # probe processes compare it with "cpu"
    model = load_model(model_path, layout, model_seed, batch_size, device)
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


@cli.command()
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
    text = score_markdown(table, overall_scores(table))
    click.echo(text)
    if out:
        files.write_text(Path(out), text)


if __name__ == "__main__":
    cli()
