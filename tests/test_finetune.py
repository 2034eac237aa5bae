"""finetune.py on tiny runs: learning, the frozen encoder of --linear, layer-wise lr decay, exact
resume, augmentation only in training, bad labels and bad clips, labelled folders.

A 1-block random encoder (a preset with --set overrides), three classes of noisy tones of
0.5 s and 2.5 s (so that both whole-clip and cropped inputs occur), one CPU thread.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import embed
import evaluate
import finetune
import mae

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "depth=1", "--set", "decoder_depth=1", "--set", "decoder_dim=64"]
FAST = [*TINY, "--batch-size", "4", "--seeds", "1", "--folds", "1"]
TONES = {"low": 300.0, "mid": 1200.0, "high": 4000.0}
RATE = 16000


pytestmark = pytest.mark.usefixtures("one_thread")


def tone(freq: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * freq * rng.uniform(0.9, 1.1) * t + rng.uniform(0, 6))
    return (wave + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_task(root: Path, per_class: int = 2, label_of=lambda label: label, multilabel: bool = False) -> Path:
    """A 3-fold HEAR task of tones, `per_class` clips per class and fold (0.5 s and 2.5 s);
    multilabel: the high tones also carry the label "mid"."""
    rng = np.random.default_rng(0)
    folds = ["fold00", "fold01", "fold02"]
    root.mkdir(parents=True)
    meta = {"task_name": root.name, "embedding_type": "scene",
            "prediction_type": "multilabel" if multilabel else "multiclass", "split_mode": "new_split_kfold",
            "evaluation": ["mAP"] if multilabel else ["top1_acc", "mAP"], "splits": folds}
    (root / "task_metadata.json").write_text(json.dumps(meta))
    (root / "labelvocabulary.csv").write_text("idx,label\n" + "".join(f"{i},{l}\n" for i, l in enumerate(TONES)))
    for fold in folds:
        (root / "16000" / fold).mkdir(parents=True)
        labels = {}
        for label, freq in TONES.items():
            for i in range(per_class):
                name = f"{label}_{i}.wav"
                sf.write(root / "16000" / fold / name, tone(freq, 0.5 if i % 2 else 2.5, rng), RATE)
                labels[name] = [label_of(label)] + (["mid"] if multilabel and label == "high" else [])
        (root / f"{fold}.json").write_text(json.dumps(labels))
    return root


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("data") / "tones")


def run(*args, code: int = 0):
    result = CliRunner().invoke(finetune.main, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def jobs(out: Path) -> dict:
    return json.loads((out / "jobs.json").read_text())["jobs"]


def tiny_encoder(depth: int = 1) -> mae.MAE:
    torch.manual_seed(0)
    return mae.build("mwmae-tiny", depth=depth, decoder_depth=1, decoder_dim=64)


# ----------------------------------------------------------------------------- inputs

def test_clip_input_is_the_embedding_input():
    """Training and test inputs are the log-mel chunks embed.py encodes, for short and long clips."""
    model = embed.Embedder(tiny_encoder())
    rng = np.random.default_rng(1)
    for seconds in (0.3, 1.3, 2.0, 4.7):
        wave = torch.from_numpy(tone(500.0, seconds, rng))
        x, frames = finetune.clip_input(wave, model, "clip")
        chunks, kept = model.chunks(wave)
        assert torch.equal(x.reshape(chunks.shape), chunks)
        assert frames == sum(kept)


def test_test_predictions_are_the_scene_embeddings_through_the_head():
    """Test inputs carry no augmentation: for clips of whole chunks (here 1 and 2), the averaged
    chunk logits are the head applied to embed.py's scene embedding."""
    encoder = tiny_encoder()
    classifier = finetune.Classifier(encoder, 3, linear=False).train()
    rng = np.random.default_rng(2)
    waves = [torch.from_numpy(tone(800.0, seconds, rng)) for seconds in (2.0, 4.0)]
    inputs = [finetune.clip_input(w, embed.Embedder(encoder), "clip") for w in waves]
    clips = finetune.Clips([x for x, _ in inputs], [t for _, t in inputs], torch.eye(3)[:2])
    probs = finetune.predict(classifier, clips, 3, torch.device("cpu"), torch.autocast("cpu", enabled=False),
                             multiclass=True)
    scenes = torch.stack([embed.get_scene_embeddings(w[None], embed.Embedder(encoder))[0] for w in waves])
    expected = classifier.head(scenes).softmax(-1).detach().numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert classifier.training  # predict leaves the training mode as it was


def test_augmentation_changes_only_training_batches():
    """SpecAugment and mixup change the training batch; without them it is the plain crop; the
    test chunks do not depend on them (predict takes no augmentation)."""
    cfg = tiny_encoder().cfg
    rng = np.random.default_rng(3)
    inputs = [finetune.clip_input(torch.from_numpy(tone(f, s, rng)), embed.Embedder(tiny_encoder()), "clip")
              for f, s in ((300, 0.5), (900, 2.5), (2000, 3.1))]
    clips = finetune.Clips([x for x, _ in inputs], [t for _, t in inputs], torch.eye(3))
    indices = np.array([2, 0, 1])
    plain = finetune.Augment(time_mask=0, freq_mask=0, mixup=0.0, label_smoothing=0.0)
    x0, keep0, y0 = finetune.training_batch(clips, indices, [0, 0, 5], cfg, plain, True)
    assert torch.equal(y0, torch.eye(3)[indices])
    assert torch.equal(x0[1], clips.x[0][:200]) and keep0[1].sum() == clips.frames[0]  # a short clip, whole
    for augment in (finetune.Augment(40, 16, 0.0, 0.0), finetune.Augment(0, 0, 0.5, 0.0)):
        x, keep, y = finetune.training_batch(clips, indices, [0, 0, 5], cfg, augment, True)
        assert not torch.equal(x, x0)
        again = finetune.training_batch(clips, indices, [0, 0, 5], cfg, augment, True)
        assert torch.equal(again[0], x)  # a function of (seed, fold, step)
    smoothed = finetune.training_batch(clips, indices, [0, 0, 5], cfg, finetune.Augment(0, 0, 0.0, 0.3), True)[2]
    assert torch.allclose(smoothed.max(1).values, torch.tensor(0.8)) and torch.allclose(smoothed.sum(1), torch.ones(3))
    chunks = finetune.test_chunks(clips, cfg)
    assert torch.equal(chunks[0], torch.cat([x.reshape(-1, 200, 80) for x in clips.x]))


# ----------------------------------------------------------------------------- optimisation

def test_layer_decay_gives_each_block_its_lr():
    depth, decay, lr = 3, 0.5, 1e-3
    classifier = finetune.Classifier(tiny_encoder(depth), 3, linear=False)
    optimizer = torch.optim.AdamW(finetune.param_groups(classifier, 0.05, decay))
    finetune.set_learning_rate(optimizer, lr)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    expected = {"encoder.patch_embed.weight": lr * decay ** 4, "encoder.blocks.0.attn.qkv.weight": lr * decay ** 3,
                "encoder.blocks.1.mlp.fc1.bias": lr * decay ** 2, "encoder.blocks.2.norm1.weight": lr * decay,
                "encoder.norm.weight": lr, "head.weight": lr, "head.bias": lr}
    params = dict(classifier.named_parameters())
    for name, value in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(value, rel=1e-12), name
    assert not any(name.startswith("encoder.decoder") and id(p) in lr_of for name, p in params.items())
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(params["head.weight"])] == 0.05 and decay_of[id(params["head.bias"])] == 0.0

    frozen = finetune.Classifier(tiny_encoder(depth), 3, linear=False, freeze_blocks=2)
    groups = finetune.param_groups(frozen, 0.05, decay)
    assert sorted({g["layer"] for g in groups}) == [3, 4]  # block 2, then the norm and head


def test_loss_decreases_and_results_score_with_evaluate(task, tmp_path):
    out = tmp_path / "full"
    run("mwmae-tiny", task, "--out", out, *FAST, "--batch-size", "2", "--epochs", "6", "--seeds", "2")
    losses = [job["train_loss"] for job in jobs(out).values()]
    assert all(len(l) == 6 and l[-1] < 0.8 * l[0] for l in losses), losses
    results = json.loads((out / "results.json").read_text())
    entry = results["tasks"]["tones"]
    assert entry["test_folds"] == ["fold00"] and entry["all_folds"] == 3
    assert len(entry["scores"]["top1_acc"]["per_seed"]) == 2
    assert "fold00 of 3" in (out / "results.md").read_text()
    score = CliRunner().invoke(evaluate.main, ["score", str(out), str(out)])
    assert "two results are named" in score.output  # read as evaluate.py results
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text((out / "results.json").read_text())
    score = CliRunner().invoke(evaluate.main, ["score", str(out), str(other)])
    assert score.exit_code == 0 and "| full |" in score.output, score.output


def test_linear_leaves_the_encoder_bit_identical(task, tmp_path):
    start = finetune.load_encoder("mwmae-tiny", tuple(TINY[1::2]))[0].mae.state_dict()
    for mode, flags in (("linear", ["--linear"]), ("full", [])):
        out = tmp_path / mode
        run("mwmae-tiny", task, "--out", out, *FAST, "--batch-size", "2", "--epochs", "4", "--stop-at", "5", *flags)
        state = torch.load(out / finetune.CHECKPOINT, weights_only=True)
        assert state["step"] == 5
        encoder = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
        same = all(torch.equal(encoder[k], start[k]) for k in start)
        assert same == (mode == "linear"), mode
        assert ("feature_norm.running_mean" in state["model"]) == (mode == "linear")  # MAE's probe head
        assert not torch.equal(state["model"]["head.weight"].abs().sum(), torch.tensor(0.0))


# ----------------------------------------------------------------------------- resume

def test_resume_equals_an_uninterrupted_run(task, tmp_path):
    """Stops inside an epoch (3 steps each) of the first job, then of the second."""
    common = ["mwmae-tiny", task, *FAST, "--batch-size", "2", "--seeds", "2", "--epochs", "3",
              "--save-every", "100"]
    run(*common, "--out", tmp_path / "whole")
    out = tmp_path / "split"
    run(*common, "--out", out, "--stop-at", "2")
    assert jobs(out) == {} and (out / finetune.CHECKPOINT).exists()
    run(*common, "--out", out, "--stop-at", "2", code=1)  # a run in OUT needs --resume
    run(*common, "--out", out, "--resume", "--stop-at", "2")  # finishes job 1, stops job 2
    assert list(jobs(out)) == ["fold0-seed0"]
    run(*common, "--epochs", "4", "--out", out, "--resume", code=1)  # other settings refused
    run(*common, "--out", out, "--resume")
    whole, split = jobs(tmp_path / "whole"), jobs(out)
    assert whole.keys() == split.keys() == {"fold0-seed0", "fold0-seed1"}
    for name in whole:
        assert whole[name]["train_loss"] == split[name]["train_loss"]
        assert whole[name]["scores"] == split[name]["scores"]
    assert not (out / finetune.CHECKPOINT).exists()


def test_sigterm_checkpoints_and_resume_finishes(task, tmp_path):
    """SIGTERM in a real process: exit 143 with a checkpoint of the running job; --resume ends it."""
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "finetune.py"), "mwmae-tiny", str(task), "--out", str(out),
            *FAST, "--epochs", "200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:  # the job has started once its first line is out
        if "jobs (1 to run)" in line:
            break
    process.send_signal(15)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 143, output
    assert "stopped by SIGTERM" in output
    step = torch.load(out / finetune.CHECKPOINT, weights_only=True)["step"]
    assert 0 < step < 200
    run("mwmae-tiny", task, "--out", out, *FAST, "--epochs", "200", "--resume", "--stop-at", str(step + 1))
    assert torch.load(out / finetune.CHECKPOINT, weights_only=True)["step"] == step + 1


def test_two_processes_equal_one_at_the_same_global_batch(task, tmp_path):
    """torchrun with 2 gloo processes x batch 2 = 1 process x batch 4: each process takes its
    rows of the same global batch."""
    common = [*FAST, "--epochs", "3", "--lr", "3e-3"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "finetune.py"), "mwmae-tiny", str(task), *common, "--batch-size", "2",
                    "--out", str(tmp_path / "ddp")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=240,
                   capture_output=True)
    run("mwmae-tiny", task, *common, "--batch-size", "4", "--out", tmp_path / "single")
    ddp, single = jobs(tmp_path / "ddp")["fold0-seed0"], jobs(tmp_path / "single")["fold0-seed0"]
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
    assert single["train_loss"][-1] != pytest.approx(single["train_loss"][0], abs=1e-3)
    assert ddp["scores"] == pytest.approx(single["scores"], abs=1e-6)


# ----------------------------------------------------------------------------- bad input, folders

def test_multilabel_task_with_balanced_sampling(tmp_path):
    """BCE on multi-hot targets, balanced draws (clips with rare labels come more often), mAP."""
    task = write_task(tmp_path / "multi", multilabel=True)
    clips = finetune.Clips([torch.zeros(200, 80)] * 3, [50] * 3, torch.tensor([[1., 0.], [1., 0.], [0., 1.]]))
    draws = np.concatenate([finetune.epoch_order(clips, 0, 0, epoch, balanced=True) for epoch in range(200)])
    assert np.mean(draws == 2) == pytest.approx(0.5, abs=0.05)  # 1 clip of label 1 = 2 clips of label 0
    out = tmp_path / "out"
    run("mwmae-tiny", task, "--out", out, *FAST, "--batch-size", "2", "--epochs", "3", "--balanced")
    entry = json.loads((out / "results.json").read_text())["tasks"]["multi"]
    assert entry["primary"] == "mAP" and 0 < entry["scores"]["mAP"]["mean"] <= 1


def test_unknown_label_is_refused_before_training(tmp_path):
    task = write_task(tmp_path / "bad", per_class=1, label_of=lambda label: "piano" if label == "mid" else label)
    out = tmp_path / "out"
    result = run("mwmae-tiny", task, "--out", out, *FAST, code=1)
    assert result.output.count("\n") <= 2 and "'piano' is not in labelvocabulary.csv" in result.output
    assert not out.exists()


def test_unreadable_clip_is_skipped_and_reported(tmp_path):
    task = write_task(tmp_path / "task")
    broken = task / "16000" / "fold02" / "low_0.wav"
    broken.write_bytes(b"not audio at all")
    out = tmp_path / "out"
    result = run("mwmae-tiny", task, "--out", out, *FAST, "--epochs", "1")
    assert "1 clip skipped" in result.output
    assert str(broken) in (out / "bad_files.tsv").read_text()
    entry = json.loads((out / "results.json").read_text())["tasks"]["task"]
    assert list(entry["bad_files"]) == [str(broken)] and entry["examples"] == 6 * 2 - 1  # folds 0, 2


def test_labelled_folder_makes_five_seeded_folds(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    for label, freq in TONES.items():
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(5):
            sf.write(tmp_path / "data" / label / f"{i}.wav", tone(freq, 0.5, rng), RATE)
    task = finetune.labelled_folder_task(tmp_path / "data")
    assert task.labels == sorted(TONES) and len(task.metadata["splits"]) == 5
    assert all(len(task.splits[f]) == 3 for f in task.metadata["splits"])  # one clip of each class
    monkeypatch.chdir(tmp_path)
    assert finetune.labelled_folder_task(Path("data")).splits == task.splits  # deterministic, any path
    run("mwmae-tiny", tmp_path / "data", "--out", tmp_path / "out", *FAST, "--epochs", "1", "--seeds", "2",
        "--max-train-clips", "5")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"]["data"]["test_folds"] == ["fold00"] and results["tasks"]["data"]["all_folds"] == 5
    assert [job["train_clips"] for job in jobs(tmp_path / "out").values()] == [5, 5]  # of 12
    assert results["tasks"]["data"]["examples"] == 5 + 3  # only the subset and the test fold are read


def test_training_subset_is_the_same_for_every_seed():
    rows = np.arange(100, 140)
    subset = finetune.training_subset(rows, 0, 10)
    assert len(set(subset)) == 10 and set(subset) <= set(rows)
    assert np.array_equal(finetune.training_subset(rows, 0, 10), subset)
    assert not np.array_equal(finetune.training_subset(rows, 1, 10), subset)
    assert finetune.training_subset(rows, 0, None) is rows
