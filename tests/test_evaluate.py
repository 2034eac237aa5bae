"""Tests for evaluate.py and hear_tasks.py: task folders and their splits, the probe, and the
command line end to end on small synthetic HEAR tasks (the scores themselves are tested in
test_metrics.py)."""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import checkpoints
import embed
import evaluate
import hear_tasks
import mae
import metrics
from test_metrics import imported_modules

SMALL = dict(depth=1, decoder_depth=1, decoder_dim=64)
FAST = evaluate.ProbeConfig(max_epochs=45, patience=5)
TONES = {"low": 300.0, "mid": 1200.0, "high": 4000.0}


def write_task(root, split_mode="new_split_kfold", per_split=4, seed=0, shuffle_labels=False, rate=16000):
    """A HEAR task of three classes of noisy sine tones (0.5 s), `per_split` clips per class."""
    rng = np.random.default_rng(seed)
    splits = ["fold00", "fold01", "fold02"] if split_mode.endswith("kfold") else ["train", "valid", "test"]
    root.mkdir(parents=True)
    meta = {"task_name": root.name, "embedding_type": "scene", "prediction_type": "multiclass",
            "split_mode": split_mode, "nfolds": len(splits), "evaluation": ["top1_acc", "mAP"], "splits": splits}
    (root / "task_metadata.json").write_text(json.dumps(meta))
    (root / "labelvocabulary.csv").write_text("idx,label\n" + "".join(f"{i},{l}\n" for i, l in enumerate(TONES)))
    t = np.arange(int(0.5 * rate)) / rate
    for split in splits:
        (root / str(rate) / split).mkdir(parents=True)
        labels = {}
        for label, freq in TONES.items():
            for i in range(per_split):
                f = freq * rng.uniform(0.9, 1.1)
                wave = 0.3 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) + 0.01 * rng.standard_normal(len(t))
                name = f"{label}_{i}.wav"
                sf.write(root / str(rate) / split / name, wave.astype(np.float32), rate)
                labels[name] = [str(rng.choice(list(TONES))) if shuffle_labels else label]
        (root / f"{split}.json").write_text(json.dumps(labels))
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return embed.Embedder(mae.build("mwmae-tiny", **SMALL), batch_size=16, source="test model")


# ----------------------------------------------------------------------------- task folders

def test_task_module_imports_no_model_code():
    """Task folders are read without the model: hear_tasks needs only audio, files and metrics."""
    loaded = imported_modules("hear_tasks")
    assert {"audio", "files", "metrics"} <= loaded
    assert not loaded & {"attention", "mae", "checkpoints", "embed", "data", "evaluate"}


def test_task_command_checks_and_summarises(tmp_path):
    """python hear_tasks.py TASK...: a summary of a good folder, one line for a bad one."""
    good = write_task(tmp_path / "tones")
    (tmp_path / "bad").mkdir()
    runner = CliRunner()
    ok = runner.invoke(hear_tasks.main, [str(good)])
    assert ok.exit_code == 0, ok.output
    assert "tones: scene / multiclass, 3 labels, primary score top1_acc" in ok.output
    assert "fold00 12, fold01 12, fold02 12" in ok.output and "split 3:" in ok.output
    bad = runner.invoke(hear_tasks.main, [str(tmp_path / "bad")])
    assert bad.exit_code == 1 and bad.output.strip().splitlines() == [
        f"Error: {tmp_path / 'bad'}: not a HEAR task folder (no task_metadata.json)"]


def test_kfold_and_trainvaltest_splits():
    folds = {"split_mode": "new_split_kfold", "splits": ["fold02", "fold00", "fold01", "fold03", "fold04"]}
    splits = hear_tasks.data_splits(folds)
    assert splits[0] == {"train": ["fold02", "fold03", "fold04"], "valid": ["fold01"], "test": ["fold00"]}
    assert splits[4] == {"train": ["fold01", "fold02", "fold03"], "valid": ["fold00"], "test": ["fold04"]}
    assert sorted(s["test"][0] for s in splits) == sorted(folds["splits"])
    assert hear_tasks.data_splits({"split_mode": "trainvaltest", "splits": ["train", "valid", "test"]}) == [
        {"train": ["train"], "valid": ["valid"], "test": ["test"]}]
    with pytest.raises(ValueError):
        hear_tasks.data_splits({"split_mode": "leave_one_out", "splits": []})


# ----------------------------------------------------------------------------- probe

def test_probe_is_hear_eval_kit_predictor():
    probe = evaluate.make_probe(960, 7, 0.25)
    kinds = [type(m) for m in probe]
    assert kinds == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.Dropout, torch.nn.ReLU, torch.nn.Linear]
    assert probe[0].out_features == 1024 and probe[2].p == 0.25 and probe[4].out_features == 7


def test_minibatches():
    assert evaluate.minibatches(1024, 1024, torch.device("cpu")) == [slice(None)]
    torch.manual_seed(0)
    batches = evaluate.minibatches(2049, 1024, torch.device("cpu"))
    assert [len(b) for b in batches] == [1024, 1025]  # a lone last example is merged
    assert sorted(torch.cat(batches).tolist()) == list(range(2049))


@pytest.mark.parametrize("split_mode", ["new_split_kfold", "trainvaltest"])
def test_probe_learns_tones(tmp_path, model, split_mode):
    task = hear_tasks.load_task(write_task(tmp_path / "tones", split_mode))
    emb = evaluate.task_embeddings(task, model, None, {})
    assert emb.x.shape == (36, 960) and not emb.bad and len(emb.items) == 36
    result = evaluate.evaluate_task(task, emb, seed=0, cfg=FAST)
    assert len(result["folds"]) == (3 if split_mode.endswith("kfold") else 1)
    assert result["scores"]["top1_acc"] >= 0.9
    assert result["dropout"] in (0.1, 0.25)


def test_probe_cannot_learn_random_labels(tmp_path, model):
    task = hear_tasks.load_task(write_task(tmp_path / "random", shuffle_labels=True, seed=3, per_split=6))
    emb = evaluate.task_embeddings(task, model, None, {})
    result = evaluate.evaluate_task(task, emb, seed=0, cfg=FAST)
    assert result["scores"]["top1_acc"] < 0.7


# ----------------------------------------------------------------------------- command line

def test_cli_run_cache_and_score(tmp_path, model, monkeypatch):
    tasks = [write_task(tmp_path / "tones_a", seed=1, per_split=2),
             write_task(tmp_path / "tones_b", "trainvaltest", seed=2, per_split=2, rate=22050)]
    (tasks[0] / "16000" / "fold01" / "low_0.wav").write_bytes(b"broken")
    checkpoint = tmp_path / "model.safetensors"
    checkpoints.save_pretrained(model.mae, checkpoint)
    runner = CliRunner()
    args = [str(checkpoint), *map(str, tasks), "--seeds", "2", "--max-epochs", "9", "--device", "cpu"]
    first = runner.invoke(evaluate.main, [*args, "--out", str(tmp_path / "results" / "m1")])  # no `run`
    assert first.exit_code == 0, first.output
    results = json.loads((tmp_path / "results" / "m1" / "results.json").read_text())
    a = results["tasks"]["tones_a"]
    assert a["examples"] == 17 and list(a["bad_files"].values()) != [] and len(a["runs"]) == 2
    assert len(a["scores"]["top1_acc"]["per_seed"]) == 2 and not math.isnan(a["scores"]["top1_acc"]["ci95"])
    assert results["tasks"]["tones_b"]["examples"] == 18
    assert "| tones_a | top1_acc |" in (tmp_path / "results" / "m1" / "results.md").read_text()

    def no_embedding(*args, **kwargs):
        raise AssertionError("cached embeddings were recomputed")

    monkeypatch.setattr(embed, "scene_embeddings", no_embedding)
    (tmp_path / "results" / "m2" / "cache").mkdir(parents=True)
    for cache in (tmp_path / "results" / "m1" / "cache").iterdir():
        (tmp_path / "results" / "m2" / "cache" / cache.name).write_bytes(cache.read_bytes())
    second = runner.invoke(evaluate.main, ["run", *args, "--out", str(tmp_path / "results" / "m2")])
    assert second.exit_code == 0, second.output

    table = runner.invoke(evaluate.main, ["score", str(tmp_path / "results" / "m1"),
                                         str(tmp_path / "results" / "m2" / "results.json")])
    assert table.exit_code == 0, table.output
    assert "| model | tones_a | tones_b | s(m) |" in table.output


def test_parallel_probes_equal_sequential(tmp_path, model):
    """(task, seed) jobs in 2 spawned processes give exactly what one process gives, in the
    same places of results.json (same threads, so the same arithmetic)."""
    tasks = [write_task(tmp_path / "tones_a", seed=1, per_split=2),
             write_task(tmp_path / "tones_b", "trainvaltest", seed=2, per_split=2)]
    checkpoint = tmp_path / "model.safetensors"
    checkpoints.save_pretrained(model.mae, checkpoint)
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        result = CliRunner().invoke(evaluate.main, [str(checkpoint), *map(str, tasks), "--seeds", "3", "--max-epochs",
                                                   "12", "--device", "cpu", "--jobs", str(jobs), "--threads", "1",
                                                   "--out", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "results.json").read_text())
        assert list(report["tasks"]) == ["tones_a", "tones_b"] and report["probe_processes"] == jobs
        runs[jobs] = {name: [{k: v for k, v in run.items() if k != "seconds"} for run in task["runs"]]
                      for name, task in report["tasks"].items()}
    assert [run["seed"] for run in runs[2]["tones_a"]] == [0, 1, 2]
    assert runs[1] == runs[2]


# ----------------------------------------------------------------------------- event tasks

def write_event_task(root, files_per_split=3, seconds=4.0, rate=16000, seed=0):
    """A HEAR event task: noisy silence with 0.3-0.8 s tone bursts, 'low' (300 Hz) or 'high'
    (4 kHz), two or three per file, at random times."""
    rng = np.random.default_rng(seed)
    splits = ["train", "valid", "test"]
    root.mkdir(parents=True)
    meta = {"task_name": root.name, "embedding_type": "event", "prediction_type": "multilabel",
            "split_mode": "trainvaltest", "evaluation": ["event_onset_200ms_fms", "segment_1s_er"], "splits": splits}
    (root / "task_metadata.json").write_text(json.dumps(meta))
    (root / "labelvocabulary.csv").write_text("idx,label\n0,low\n1,high\n")
    t = np.arange(int(seconds * rate)) / rate
    for split in splits:
        (root / str(rate) / split).mkdir(parents=True)
        events = {}
        for i in range(files_per_split):
            wave = 0.01 * rng.standard_normal(len(t))
            name, events[f"clip{i}.wav"] = f"clip{i}.wav", []
            for slot in range(int(rng.integers(2, 4))):  # one burst per 1.3-s slot, no overlaps
                start = slot * 1.3 + rng.uniform(0.0, 0.4)
                end = start + rng.uniform(0.3, 0.8)
                label = str(rng.choice(["low", "high"]))
                on = (t >= start) & (t < end)
                wave[on] += 0.3 * np.sin(2 * np.pi * (300.0 if label == "low" else 4000.0) * t[on])
                events[name].append({"label": label, "start": start * 1000, "end": end * 1000})
            sf.write(root / str(rate) / split / name, wave.astype(np.float32), rate)
        (root / f"{split}.json").write_text(json.dumps(events))
    return root


def test_frame_targets(tmp_path):
    task = hear_tasks.load_task(write_event_task(tmp_path / "ev", files_per_split=1))
    item = ("train", "clip0.wav")
    stamps = np.arange(100) * 40.0 + 15
    y = task.frame_targets(item, stamps)
    for event in task.events(*item):
        c = task.labels.index(event["label"])
        inside = (stamps >= event["start"]) & (stamps <= event["end"])
        assert y[inside, c].all() and inside.any()
    assert y.sum() == sum(((stamps >= e["start"]) & (stamps <= e["end"])).sum() for e in task.events(*item))


def test_event_task_end_to_end(tmp_path, model):
    """An event task through the command line: timestamp embeddings, frame probes, events,
    sed_eval-style scores; the tones are easy, so the onsets are found."""
    root = write_event_task(tmp_path / "bursts")
    checkpoint = tmp_path / "model.safetensors"
    checkpoints.save_pretrained(model.mae, checkpoint)
    out = tmp_path / "out"
    result = CliRunner().invoke(evaluate.main, [str(checkpoint), str(root), "--seeds", "2", "--max-epochs", "60",
                                               "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())["tasks"]["bursts"]
    assert report["primary"] == "event_onset_200ms_fms" and report["frames"] == 9 * 100
    fold = report["runs"][0]["folds"][0]
    assert fold["postprocessing"] in [dict(p) for p in metrics.POSTPROCESSING_GRID]
    assert report["scores"]["event_onset_200ms_fms"]["mean"] >= 0.5
    assert 0 <= report["scores"]["segment_1s_er"]["mean"] < 1.0


def test_event_task_checks(tmp_path):
    root = write_event_task(tmp_path / "ev", files_per_split=1)
    meta = json.loads((root / "task_metadata.json").read_text())
    (root / "task_metadata.json").write_text(json.dumps({**meta, "evaluation": ["segment_1s_er"]}))
    with pytest.raises(ValueError, match="error rate"):
        hear_tasks.load_task(root)
    (root / "task_metadata.json").write_text(json.dumps({**meta, "evaluation": ["top1_acc"]}))
    with pytest.raises(ValueError, match="not supported for event tasks"):
        hear_tasks.load_task(root)
    (root / "task_metadata.json").write_text(json.dumps({**meta, "prediction_type": "multiclass"}))
    with pytest.raises(ValueError, match="multilabel"):
        hear_tasks.load_task(root)


def test_bad_labels_are_refused_before_embedding(tmp_path):
    root = write_task(tmp_path / "tones", per_split=1)
    labels = json.loads((root / "fold00.json").read_text())
    for bad, message in ([["nope"], "not in labelvocabulary"], [["low", "mid"], "2 labels in a multiclass task"]):
        (root / "fold00.json").write_text(json.dumps({**labels, "low_0.wav": bad}))
        with pytest.raises(ValueError, match=message):
            hear_tasks.load_task(root)
    events = write_event_task(tmp_path / "ev", files_per_split=1)
    good = json.loads((events / "train.json").read_text())
    for bad, message in ([{"label": "low", "start": 10.0}], "need label, start and end"), \
                        ([{"label": "low", "start": 10.0, "end": 5.0}], "ends before it starts"), \
                        ([{"label": "x", "start": 0.0, "end": 5.0}], "not in labelvocabulary"):
        (events / "train.json").write_text(json.dumps({**good, "clip0.wav": bad}))
        with pytest.raises(ValueError, match=message):
            hear_tasks.load_task(events)


def test_cli_split_without_readable_audio(tmp_path, model):
    """Every test file unreadable: a one-line error, not a traceback."""
    root = write_task(tmp_path / "tones", "trainvaltest", per_split=1)
    for path in (root / "16000" / "test").iterdir():
        path.write_bytes(b"not audio")
    checkpoint = tmp_path / "model.safetensors"
    checkpoints.save_pretrained(model.mae, checkpoint)
    result = CliRunner().invoke(evaluate.main, [str(checkpoint), str(root), "--seeds", "1", "--max-epochs", "3",
                                               "--device", "cpu", "--jobs", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no examples in split(s) ['test']" in result.output
    assert not isinstance(result.exception, ValueError)
