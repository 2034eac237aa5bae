"""Tests for evaluate.py: splits, scores against sklearn/scipy, confidence intervals, s(m),
and the probe and command line end to end on small synthetic HEAR tasks."""
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import embed
import evaluate
import mae

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


# ----------------------------------------------------------------------------- splits

def test_kfold_and_trainvaltest_splits():
    folds = {"split_mode": "new_split_kfold", "splits": ["fold02", "fold00", "fold01", "fold03", "fold04"]}
    splits = evaluate.data_splits(folds)
    assert splits[0] == {"train": ["fold02", "fold03", "fold04"], "valid": ["fold01"], "test": ["fold00"]}
    assert splits[4] == {"train": ["fold01", "fold02", "fold03"], "valid": ["fold00"], "test": ["fold04"]}
    assert sorted(s["test"][0] for s in splits) == sorted(folds["splits"])
    assert evaluate.data_splits({"split_mode": "trainvaltest", "splits": ["train", "valid", "test"]}) == [
        {"train": ["train"], "valid": ["valid"], "test": ["test"]}]
    with pytest.raises(ValueError):
        evaluate.data_splits({"split_mode": "leave_one_out", "splits": []})


# ----------------------------------------------------------------------------- scores

def test_scores_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 5)) < 0.3).astype(np.float32)
    targets[:, 4] = 0  # a class without positives: AP 0, as sklearn gives
    probs = np.round(rng.random((60, 5)), 1)  # many ties
    with pytest.warns(UserWarning):
        expected = metrics.average_precision_score(targets, probs, average="macro")
    assert evaluate.mean_average_precision(probs, targets) == pytest.approx(expected, abs=1e-9)
    for c in range(4):
        assert evaluate.roc_auc(probs[:, c], targets[:, c]) == pytest.approx(
            metrics.roc_auc_score(targets[:, c], probs[:, c]), abs=1e-12)
    assert math.isnan(evaluate.aucroc(probs, targets))  # a class without positives
    assert evaluate.aucroc(probs[:, :4], targets[:, :4]) == pytest.approx(
        metrics.roc_auc_score(targets[:, :4], probs[:, :4], average="macro"), abs=1e-12)


def test_d_prime_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    targets = (rng.random((80, 3)) < 0.5).astype(np.float32)
    probs = rng.random((80, 3)) + 0.3 * targets
    aucs = [evaluate.roc_auc(probs[:, c], targets[:, c]) for c in range(3)]
    expected = np.mean(stats.norm().ppf(aucs) * np.sqrt(2))
    assert evaluate.d_prime(probs, targets) == pytest.approx(expected, abs=1e-9)


def test_top1_and_chroma_accuracy():
    targets = np.eye(24, dtype=np.float32)[[0, 1, 2, 13]]
    probs = np.eye(24)[[0, 1, 14, 0]]  # right, right, octave error, wrong
    assert evaluate.top1_accuracy(probs, targets) == 0.5
    assert evaluate.chroma_accuracy(probs, targets) == 0.75


# ----------------------------------------------------------------------------- statistics

def test_t_quantiles():
    assert evaluate.t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert evaluate.t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-4)
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 41):
        assert evaluate.t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-9)
        assert evaluate.t_quantile(0.99, df) == pytest.approx(stats.t.ppf(0.995, df), abs=1e-8)


def test_mean_ci():
    mean, half = evaluate.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    mean, half = evaluate.mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half)


def test_overall_score():
    scores = {"a": {"t1": 0.9, "t2": 0.5, "t3": 0.7}, "b": {"t1": 0.7, "t2": 0.6, "t3": 0.7},
              "c": {"t1": 0.8, "t2": 0.4, "t3": 0.7, "t4": 1.0}}
    s = evaluate.overall_scores(scores)  # t3 ties everywhere, t4 is not shared: both left out
    assert s["a"] == pytest.approx((100 + 50) / 2)
    assert s["b"] == pytest.approx((0 + 100) / 2)
    assert s["c"] == pytest.approx((50 + 0) / 2)
    assert math.isnan(evaluate.overall_scores({"a": {"t1": 0.9}})["a"])


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
    task = evaluate.load_task(write_task(tmp_path / "tones", split_mode))
    embeddings, items, bad = evaluate.task_embeddings(task, model, None, {})
    assert embeddings.shape == (36, 960) and not bad
    result = evaluate.evaluate_task(task, embeddings, items, seed=0, cfg=FAST)
    assert len(result["folds"]) == (3 if split_mode.endswith("kfold") else 1)
    assert result["scores"]["top1_acc"] >= 0.9
    assert result["dropout"] in (0.1, 0.25)


def test_probe_cannot_learn_random_labels(tmp_path, model):
    task = evaluate.load_task(write_task(tmp_path / "random", shuffle_labels=True, seed=3, per_split=6))
    embeddings, items, _ = evaluate.task_embeddings(task, model, None, {})
    result = evaluate.evaluate_task(task, embeddings, items, seed=0, cfg=FAST)
    assert result["scores"]["top1_acc"] < 0.7


def test_event_tasks_are_refused(tmp_path):
    root = write_task(tmp_path / "events", per_split=1)
    meta = json.loads((root / "task_metadata.json").read_text())
    (root / "task_metadata.json").write_text(json.dumps({**meta, "embedding_type": "event"}))
    with pytest.raises(NotImplementedError, match="only scene tasks"):
        evaluate.load_task(root)


# ----------------------------------------------------------------------------- command line

def test_cli_run_cache_and_score(tmp_path, model, monkeypatch):
    tasks = [write_task(tmp_path / "tones_a", seed=1, per_split=2),
             write_task(tmp_path / "tones_b", "trainvaltest", seed=2, per_split=2, rate=22050)]
    (tasks[0] / "16000" / "fold01" / "low_0.wav").write_bytes(b"broken")
    checkpoint = tmp_path / "model.safetensors"
    mae.save_pretrained(model.mae, checkpoint)
    runner = CliRunner()
    args = [str(checkpoint), *map(str, tasks), "--seeds", "2", "--max-epochs", "9", "--device", "cpu"]
    first = runner.invoke(evaluate.cli, [*args, "--out", str(tmp_path / "results" / "m1")])  # no `run`
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
    second = runner.invoke(evaluate.cli, ["run", *args, "--out", str(tmp_path / "results" / "m2")])
    assert second.exit_code == 0, second.output

    table = runner.invoke(evaluate.cli, ["score", str(tmp_path / "results" / "m1"),
                                         str(tmp_path / "results" / "m2" / "results.json")])
    assert table.exit_code == 0, table.output
    assert "| model | tones_a | tones_b | s(m) |" in table.output


def test_cli_refuses_event_tasks(tmp_path):
    root = write_task(tmp_path / "events", per_split=1)
    meta = json.loads((root / "task_metadata.json").read_text())
    (root / "task_metadata.json").write_text(json.dumps({**meta, "embedding_type": "event"}))
    result = CliRunner().invoke(evaluate.cli, ["mwmae-tiny", str(root), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "only scene tasks" in result.output


def test_parallel_probes_equal_sequential(tmp_path, model):
    """(task, seed) jobs in 2 spawned processes give exactly what one process gives, in the
    same places of results.json (same threads, so the same arithmetic)."""
    tasks = [write_task(tmp_path / "tones_a", seed=1, per_split=2),
             write_task(tmp_path / "tones_b", "trainvaltest", seed=2, per_split=2)]
    checkpoint = tmp_path / "model.safetensors"
    mae.save_pretrained(model.mae, checkpoint)
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        result = CliRunner().invoke(evaluate.cli, [str(checkpoint), *map(str, tasks), "--seeds", "3", "--max-epochs",
                                                   "12", "--device", "cpu", "--jobs", str(jobs), "--threads", "1",
                                                   "--out", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "results.json").read_text())
        assert list(report["tasks"]) == ["tones_a", "tones_b"] and report["probe_processes"] == jobs
        runs[jobs] = {name: [{k: v for k, v in run.items() if k != "seconds"} for run in task["runs"]]
                      for name, task in report["tasks"].items()}
    assert [run["seed"] for run in runs[2]["tones_a"]] == [0, 1, 2]
    assert runs[1] == runs[2]
