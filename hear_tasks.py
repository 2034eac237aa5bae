"""HEAR task folders: read one, check everything evaluation relies on, and say how its data
splits into training, validation and test sets.

Layout (hear-preprocess, github.com/hearbenchmark/hear-preprocess):
    task_metadata.json    task_name, embedding_type (scene | event), prediction_type
                          (multiclass | multilabel), split_mode, splits, evaluation (primary
                          score first; names from metrics.SCORES or metrics.EVENT_SCORES)
    labelvocabulary.csv   idx,label
    <split>.json          {file: [labels]}, or {file: [{"label", "start", "end"} in ms]} for
                          event tasks
    <sample rate>/<split>/<file>   the audio (16000 preferred; any rate is resampled when read)

load_task refuses a malformed folder with a ValueError naming the file and what it should
hold (missing keys, unknown scores, labels not in the vocabulary, multiclass files without
exactly one label, events that end before they start, ...) before any audio is read, so that
an evaluation never fails hours in. data_splits gives hear-eval-kit's splits: trainvaltest as
given; k-fold tasks use each sorted fold once as test, the next one as validation and the rest
for training.

Imports no model code: audio (the sample rate), files (printable paths) and metrics (the score
names a task may ask for).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

import audio
import files
import metrics


@dataclass
class Task:
    """A HEAR task folder as load_task read and checked it: its metadata, label vocabulary and
    the labels (or events) of every file of every split."""
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
    above = [r for r in rates if r >= audio.SAMPLE_RATE]
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
    known = metrics.SCORES if kind == "scene" else metrics.EVENT_SCORES
    unknown = [s for s in metadata["evaluation"] if s not in known]
    if not metadata["evaluation"] or unknown:
        raise ValueError(f"{where}: scores {unknown or '(none)'} not supported for {kind} tasks; "
                         f"known: {', '.join(known)}")
    if kind == "event" and not metrics.EVENT_SCORES[metadata["evaluation"][0]].maximize:
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



def task_file_name(name: str) -> str:
    """A task name as a file name inside --out: only letters, digits, '.', '-' and '_', never
    hidden or a path (a task_name of '../../x' stays inside); a name that had to change gets a
    short hash of the original so that two tasks never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if safe == name:
        return name
    return f"{safe or 'task'}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


@click.command()
@click.argument("task_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def main(task_dirs: tuple[str, ...]) -> None:
    """Check HEAR task folders as evaluate.py would (before any audio is read) and summarise
    each: kind, labels, files per split, audio folder and how the splits are used."""
    for task_dir in task_dirs:
        try:
            task = load_task(task_dir)
        except (ValueError, OSError) as error:
            raise click.ClickException(str(error)) from None
        meta = task.metadata
        counts = ", ".join(f"{split} {len(task.splits[split])}" for split in meta["splits"])
        click.echo(f"{task.name}: {task.embedding_type} / {task.prediction_type}, "
                   f"{len(task.labels)} labels, primary score {task.primary_score}")
        click.echo(f"  files: {counts}; audio in {files.shown(task.audio_dir)}")
        for n, split in enumerate(data_splits(meta), 1):
            click.echo(f"  split {n}: " + "; ".join(f"{part} {'+'.join(names)}" for part, names in split.items()))


if __name__ == "__main__":
    main()
