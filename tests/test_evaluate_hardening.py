"""evaluate.py against bad options, bad models, hostile or malformed task folders, NaN audio,
stale caches and shared output folders: one line naming the problem, never a traceback, a
NaN probe, a file outside --out or a lost result."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import checkpoints
import embed
import evaluate
import hear_tasks
import files
import mae
from test_evaluate import SMALL, write_task


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    checkpoints.save_pretrained(mae.build("mwmae-tiny", **SMALL), path)
    return path


@pytest.fixture
def tones(tmp_path):
    """A tiny trainvaltest task: 3 classes x 1 clip of 0.5 s per split."""
    return write_task(tmp_path / "tones", "trainvaltest", per_split=1)


def run(*args):
    """evaluate.py run ... in this process, with fast settings that `args` may override."""
    fast = ["--device", "cpu", "--jobs", "1", "--seeds", "1", "--max-epochs", "3"]
    return CliRunner().invoke(evaluate.main, ["run", *fast, *map(str, args)])


def assert_one_line_error(result, *expected):
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and "weights_only" not in result.output
    for text in expected:
        assert text in lines[0], lines[0]


# ----------------------------------------------------------------------------- options and models

@pytest.mark.parametrize("option", ["--seeds", "--batch-size", "--max-epochs", "--jobs", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_below_one_are_refused(tmp_path, checkpoint, tones, option, value):
    result = run(checkpoint, tones, "--out", tmp_path / "out", option, value)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_epochs", [1, 2])
def test_runs_shorter_than_one_check_validate_at_the_end(tmp_path, checkpoint, tones, max_epochs):
    """Validation is every 3 epochs; --max-epochs 1 or 2 used to end without any check."""
    out = tmp_path / "out"
    result = run(checkpoint, tones, "--out", out, "--max-epochs", max_epochs)
    assert result.exit_code == 0, result.output
    fold = json.loads((out / "results.json").read_text())["tasks"]["tones"]["runs"][0]["folds"][0]
    assert fold["epoch"] == max_epochs


def test_long_runs_keep_hear_eval_kits_checks():
    cfg = evaluate.ProbeConfig(max_epochs=500)
    assert [e for e in range(1, 501) if evaluate.is_check(e, cfg)] == list(range(3, 501, 3))


def model_files(tmp_path, checkpoint, tones):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    random_pt = tmp_path / "random.pt"
    random_pt.write_bytes(np.random.default_rng(0).bytes(5000))
    return {"misspelt preset": "mwmae-tinyy", "audio file": tones / "16000" / "test" / "low_0.wav",
            "truncated safetensors": truncated, "random bytes": random_pt, "missing file": tmp_path / "no.safetensors"}


@pytest.mark.parametrize("case", ["misspelt preset", "audio file", "truncated safetensors", "random bytes",
                                  "missing file"])
def test_bad_model_is_one_line(tmp_path, checkpoint, tones, case):
    model = model_files(tmp_path, checkpoint, tones)[case]
    result = run(model, tones, "--out", tmp_path / "out")
    assert_one_line_error(result, os.path.basename(str(model)))


def test_preset_model_says_it_is_random(tmp_path, tones):
    result = run("mwmae-tiny", tones, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "mwmae-tiny is a preset name: evaluating its random initialisation (seed 0), not pretrained weights" \
        in result.stderr


def test_results_md_shows_the_console_score(monkeypatch):
    """One seed has no confidence interval: console and results.md both say '± n/a'."""
    task = hear_tasks.Task(None, {"task_name": "t", "evaluation": ["top1_acc"]}, ["a"], {})
    results = {"model_arg": "m", "model": {"source": "s", "layout": "time"}, "seeds": [0], "tasks": {}}
    runs = [{"seed": 0, "dropout": 0.1, "folds": [], "seconds": 1.0, "scores": {"top1_acc": 0.391}}]
    embedded = {"examples": 3, "frames": 3, "bad_files": {}, "embedding_s": 1.0}
    printed = []
    monkeypatch.setattr(evaluate.tqdm, "write", printed.append)
    evaluate.report_task(results, task, embedded, runs)
    assert "top1_acc 39.1 ± n/a (" in printed[0]
    assert "| t | top1_acc | 39.1 ± n/a |" in evaluate.results_markdown(results)


# ----------------------------------------------------------------------------- NaN

def test_non_finite_audio_is_left_out_and_named(tmp_path, checkpoint):
    """A float WAV of 1e30 samples has a log-mel of Inf: it is left out like an unreadable
    file, named on stderr and in results.json, and no probe sees a NaN row."""
    task_dir = write_task(tmp_path / "tones", "trainvaltest", per_split=2)
    loud = task_dir / "16000" / "train" / "low_0.wav"
    sf.write(loud, np.full(8000, 1e30, np.float32), 16000, subtype="FLOAT")
    out = tmp_path / "out"
    result = run(checkpoint, task_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"left out {loud}: log-mel not finite" in result.stderr
    report = json.loads((out / "results.json").read_text())["tasks"]["tones"]
    assert list(report["bad_files"]) == [str(loud)] and report["examples"] == 17
    cached = evaluate.Embedded.load(out / "cache" / "tones.npz")
    assert np.isfinite(cached.x).all() and ("train", "low_0.wav") not in cached.items


def test_probe_refuses_non_finite_embeddings(tmp_path):
    task = hear_tasks.load_task(write_task(tmp_path / "tones", "trainvaltest", per_split=1))
    items = task.items()
    x = np.random.default_rng(0).standard_normal((len(items), 8)).astype(np.float32)
    x[4, 3] = np.nan
    emb = evaluate.Embedded(x, np.arange(len(items)), np.zeros(len(items), np.float32), items, {})
    with pytest.raises(ValueError, match=f"not finite for 1 file.*{items[4][0]}/{items[4][1]}"):
        evaluate.evaluate_task(task, emb, seed=0, cfg=evaluate.ProbeConfig(max_epochs=3))


# ----------------------------------------------------------------------------- task folders

def test_task_name_cannot_write_outside_out(tmp_path, checkpoint, tones):
    meta = json.loads((tones / "task_metadata.json").read_text())
    (tones / "task_metadata.json").write_text(json.dumps({**meta, "task_name": "../../../elsewhere/x"}))
    out = tmp_path / "a" / "b" / "out"
    before = set(tmp_path.rglob("*"))
    result = run(checkpoint, tones, "--out", out)
    assert result.exit_code == 0, result.output
    new = set(tmp_path.rglob("*")) - before
    assert new and all(path == out or out in path.parents or path in out.parents for path in new), new
    assert "../../../elsewhere/x" in json.loads((out / "results.json").read_text())["tasks"]


def test_task_file_names():
    assert hear_tasks.task_file_name("esc50-v2.0.0-full") == "esc50-v2.0.0-full"
    for name in ("../../../elsewhere/x", "..", ".hidden", "a/b", "a b", "é"):
        safe = hear_tasks.task_file_name(name)
        assert "/" not in safe and not safe.startswith(".") and safe
    assert hear_tasks.task_file_name("a/b") != hear_tasks.task_file_name("a_b")


def corrupt(task_dir, case):
    """Break one file of a task; returns the file's name."""
    meta_path = task_dir / "task_metadata.json"
    meta = json.loads(meta_path.read_text())
    if case == "metadata is a list":
        meta_path.write_text(json.dumps([meta]))
        return "task_metadata.json"
    if case == "splits is a number":
        meta_path.write_text(json.dumps({**meta, "splits": 5}))
        return "task_metadata.json"
    if case == "missing keys":
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("split_mode", "evaluation")}))
        return "task_metadata.json"
    if case == "metadata not JSON":
        meta_path.write_text("{task_name: tones")
        return "task_metadata.json"
    if case == "vocabulary without idx":
        (task_dir / "labelvocabulary.csv").write_text("id,label\n0,low\n1,mid\n2,high\n")
        return "labelvocabulary.csv"
    if case == "vocabulary not UTF-8":
        (task_dir / "labelvocabulary.csv").write_bytes("idx,label\n0,low\n1,mid\n2,caf\xe9\n".encode("latin-1"))
        return "labelvocabulary.csv"
    labels = json.loads((task_dir / "train.json").read_text())
    if case == "label is a string":
        (task_dir / "train.json").write_text(json.dumps({**labels, "high_0.wav": "high"}))
    elif case == "split is a list":
        (task_dir / "train.json").write_text(json.dumps(list(labels)))
    elif case == "split not UTF-8":
        (task_dir / "train.json").write_bytes(json.dumps(labels).replace("high_0", "h\xe9").encode("latin-1"))
    elif case == "split missing":
        (task_dir / "train.json").unlink()
    return "train.json"


CASES = {"metadata is a list": "expected an object with task_name", "splits is a number": "splits must be a list",
         "missing keys": "missing split_mode, evaluation", "metadata not JSON": "not valid JSON",
         "vocabulary without idx": "expected the header idx,label", "vocabulary not UTF-8": "not UTF-8",
         "label is a string": "high_0.wav: labels must be a list", "split is a list": "expected an object",
         "split not UTF-8": "not UTF-8", "split missing": "missing"}


@pytest.mark.parametrize("case", CASES)
def test_malformed_task_names_file_and_expectation(tmp_path, tones, case):
    name = corrupt(tones, case)
    with pytest.raises(ValueError) as error:
        hear_tasks.load_task(tones)
    message = str(error.value)
    assert message.startswith(f"{tones / name}: ") and CASES[case] in message, message


def test_malformed_task_is_one_line(tmp_path, checkpoint, tones):
    corrupt(tones, "metadata is a list")
    assert_one_line_error(run(checkpoint, tones, "--out", tmp_path / "out"), "task_metadata.json: expected an object")


# ----------------------------------------------------------------------------- caches

def embed_cached(task_dir, model, cache):
    return evaluate.task_embeddings(hear_tasks.load_task(task_dir), model, cache, {})


def test_cache_follows_the_audio(tmp_path, checkpoint, tones, monkeypatch):
    model = embed.load_model(str(checkpoint))
    cache = tmp_path / "cache.npz"
    first = embed_cached(tones, model, cache)
    for path in (tones / "16000").rglob("*.wav"):  # every clip replaced by silence, same size
        size = path.stat().st_size
        sf.write(path, np.zeros(8000, np.float32), 16000)
        assert path.stat().st_size == size
    second = embed_cached(tones, model, cache)
    assert not np.allclose(first.x, second.x)
    np.testing.assert_array_equal(second.x, embed_cached(tones, model, None).x)
    monkeypatch.setattr(embed, "embed_files", lambda *a, **k: pytest.fail("unchanged audio was embedded again"))
    np.testing.assert_array_equal(embed_cached(tones, model, cache).x, second.x)


def test_cache_follows_the_model_weights(tmp_path, checkpoint, tones):
    """A model file replaced by other weights of the same size, with its old mtime restored."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(checkpoint.read_bytes())
    cache = tmp_path / "cache.npz"
    model = embed.load_model(str(path))
    first, description = embed_cached(tones, model, cache), model.describe()
    stat = path.stat()
    torch.manual_seed(1)
    checkpoints.save_pretrained(mae.build("mwmae-tiny", **SMALL), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    model = embed.load_model(str(path))
    assert model.describe() == description  # what the cache was keyed by
    second = embed_cached(tones, model, cache)
    assert not np.allclose(first.x, second.x)
    np.testing.assert_array_equal(second.x, embed_cached(tones, model, None).x)


# ----------------------------------------------------------------------------- output folder

def test_out_of_another_model_or_other_files_is_refused(tmp_path, checkpoint, tones, monkeypatch):
    out = tmp_path / "out"
    args = [tones, "--out", out]
    assert run(checkpoint, *args).exit_code == 0
    results = (out / "results.json").read_text()
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    checkpoints.save_pretrained(mae.build("mwmae-tiny", **SMALL), other)
    assert_one_line_error(run(other, *args), "is not empty")
    assert (out / "results.json").read_text() == results

    monkeypatch.setattr(embed, "embed_files", lambda *a, **k: pytest.fail("cached embeddings were recomputed"))
    assert run(checkpoint, *args).exit_code == 0  # the same model again: its own folder, cache reused
    monkeypatch.undo()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert_one_line_error(run(checkpoint, tones, "--out", foreign), "is not empty", "--overwrite")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # a refused folder is left as it was
    result = run(checkpoint, tones, "--out", foreign, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "results.json").is_file()


def test_second_process_on_the_same_out_fails_at_once(tmp_path, checkpoint, tones):
    out = tmp_path / "out"
    with files.OutputFolder(out, own=evaluate.OUTPUTS):  # another run holds the folder
        assert_one_line_error(run(checkpoint, tones, "--out", out), "in use by another process")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
