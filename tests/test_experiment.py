"""experiment.py at toy size: a synthetic pool, a synthetic HEAR task, 2 training steps."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import data
import experiment

ROOT = Path(__file__).resolve().parents[1]
TOY_MODEL = ("--set", "depth=1", "--set", "decoder_depth=1", "--set", "decoder_dim=64")


def write_tone_task(root: Path, clips_per_split: int = 6) -> Path:
    """A HEAR scene task: 0.5-s tones, label 'low' (300 Hz) or 'high' (2 kHz)."""
    task = root / "tones-v1.0-full"
    splits = ("train", "valid", "test")
    metadata = dict(task_name="tones", version="v1.0", embedding_type="scene",
                    prediction_type="multiclass", split_mode="trainvaltest", sample_duration=0.5,
                    evaluation=["top1_acc"], sample_rate=16000, splits=list(splits))
    task.mkdir(parents=True)
    (task / "task_metadata.json").write_text(json.dumps(metadata))
    (task / "labelvocabulary.csv").write_text("idx,label\n0,low\n1,high\n")
    t = np.arange(8000) / 16000
    rng = np.random.default_rng(0)
    for split in splits:
        (task / "16000" / split).mkdir(parents=True)
        labels = {}
        for i in range(clips_per_split):
            label, pitch = ("low", 300) if i % 2 else ("high", 2000)
            audio = 0.5 * np.sin(2 * np.pi * pitch * t) + 0.01 * rng.standard_normal(len(t))
            sf.write(task / "16000" / split / f"{split}_{i}.wav", audio, 16000, subtype="PCM_16")
            labels[f"{split}_{i}.wav"] = [label]
        (task / f"{split}.json").write_text(json.dumps(labels))
    return task


def test_licences_read_machine_readable_and_free_form(tmp_path):
    dep5 = tmp_path / "dep5"
    dep5.write_text("Format: x\n\nFiles: *\nLicense: CC-BY-3.0\n\nFiles: a\nLicense: GPL-2+\n text\n")
    free = tmp_path / "free"
    free.write_text("see /usr/share/common-licenses/GPL-2 and /usr/share/common-licenses/LGPL-2.\n")
    assert experiment.licences(dep5) == ["CC-BY-3.0", "GPL-2+"]
    assert experiment.licences(free) == ["GPL-2", "LGPL-2"]


def test_subset_task_keeps_at_most_n_files_per_split(tmp_path):
    task = write_tone_task(tmp_path / "tasks")
    small = experiment.subset_task(task, tmp_path / "small" / task.name, 2)
    for split in ("train", "valid", "test"):
        kept = json.loads((small / f"{split}.json").read_text())
        assert len(kept) == 2
        assert all((small / "16000" / split / name).is_file() for name in kept)


def test_fraction_of_the_pool_is_chosen_by_file(tmp_path):
    store = data.prepare_demo(tmp_path / "pool", n_clips=20, seconds=0.5)
    first = experiment.subset_store(store.root, 0.25, tmp_path / "a")
    again = experiment.subset_store(store.root, 0.25, tmp_path / "b")
    paths = [e["path"] for e in data.read_index(first)]
    assert len(paths) == 5
    assert paths == [e["path"] for e in data.read_index(again)]
    assert experiment.subset_store(store.root, 1.0, tmp_path / "c") == store.root


def test_run_writes_the_table_and_the_loss_curves(tmp_path):
    store = data.prepare_demo(tmp_path / "pool", n_clips=8, seconds=2.0)
    write_tone_task(tmp_path / "tasks")
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "experiment.py"), "run", "--pool", str(store.root),
               "--tasks", str(tmp_path / "tasks"), "--out", str(out), "--work", str(tmp_path / "work"),
               "--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--seeds", "1",
               "--probe-epochs", "3", *TOY_MODEL]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "loss_curves.png").stat().st_size > 0
    table = (out / "score.md").read_text()
    for label in ("mae-tiny_full", "mwmae-tiny_full", "audiomaepp-tiny_full",
                  "mae-tiny_random", "mwmae-tiny_random", "audiomaepp-tiny_random"):
        assert f"| {label} |" in table
    assert "s(m)" in (out / "results.md").read_text()
    for model in experiment.MODELS:
        metrics = experiment.read_metrics(tmp_path / "work" / "pretrain" / f"{model}_full")
        assert [m["step"] for m in metrics] == [1, 2]


def test_bad_override_is_refused():
    with pytest.raises(Exception):
        experiment.checked_overrides(("no_such_field=3",))
