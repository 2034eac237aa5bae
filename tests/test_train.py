"""train.py on tiny runs: exact resume, two processes = one, NaN stop, SIGTERM, demo path.

Runs go through the command (train.main) in this process, or in a subprocess where a
signal or torchrun is involved; all on one CPU thread each, a few steps of a 1-layer model.
"""
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import data
import mae
import train
import training

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "depth=1", "--set", "decoder_depth=1", "--set", "decoder_dim=64",
        "--workers", "0", "--warmup-steps", "2", "--log-every", "1"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A tiny store: 16 synthetic clips of 2.5 s (250 frames)."""
    return data.prepare_demo(tmp_path_factory.mktemp("store"), n_clips=16, seconds=2.5).root


def run(*args) -> None:
    train.main.main([str(arg) for arg in args], standalone_mode=False)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_difference(a: Path, b: Path) -> float:
    wa, wb = checkpoints.load_pretrained(a).state_dict(), checkpoints.load_pretrained(b).state_dict()
    assert wa.keys() == wb.keys()
    return max((wa[key] - wb[key]).abs().max().item() for key in wa)


# ----------------------------------------------------------------------------- pieces

def test_schedule_warms_up_linearly_then_decays_to_zero():
    peak, warmup, total = 1e-3, 10, 110
    lrs = [training.learning_rate(step, peak, warmup, total) for step in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert all(b > a for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert lrs[warmup] == pytest.approx(peak) and lrs[60] == pytest.approx(peak / 2)
    assert all(b < a for a, b in zip(lrs[warmup:total], lrs[warmup + 1:]))
    assert lrs[total] == pytest.approx(0.0, abs=1e-15)


def test_weight_decay_only_on_weight_matrices():
    model = mae.build("mae-tiny", depth=1, decoder_depth=1, decoder_dim=64, trainable_pos=True)
    decay, no_decay = model.param_groups(0.05)
    names = {id(param): name for name, param in model.named_parameters()}
    skipped = {names[id(param)] for param in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "norm.weight",
            "blocks.0.attn.qkv.bias", "decoder_pred.bias"} <= skipped
    assert all(param.ndim == 2 or param.ndim == 4 for param in decay["params"])
    assert "blocks.0.attn.qkv.weight" in {names[id(param)] for param in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_mask_noise_depends_only_on_seed_epoch_and_clip():
    noise = train.mask_noise(torch.tensor([5, 1, 3]), seed=0, epoch=2, num_patches=250)
    assert noise.shape == (3, 250) and noise.dtype == torch.float32
    assert torch.equal(train.mask_noise(torch.tensor([3, 5]), 0, 2, 250), noise[[2, 0]])
    assert not torch.equal(train.mask_noise(torch.tensor([5]), 0, 3, 250), noise[:1])
    assert not torch.equal(train.mask_noise(torch.tensor([5]), 1, 2, 250), noise[:1])


# ----------------------------------------------------------------------------- runs

def test_resume_continues_exactly(store, tmp_path):
    """6 steps (4 per epoch) straight = 3 steps, stop, resume mid-epoch for 3 more."""
    common = [store, *TINY, "--batch-size", 4, "--max-steps", 6]
    run(*common, "--out", tmp_path / "straight")
    run(*common, "--out", tmp_path / "split", "--stop-at", 3)
    checkpoint = torch.load(tmp_path / "split/checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["data"]["micro_batch"] == 3
    assert not (tmp_path / "split/model.safetensors").exists()
    with pytest.raises(Exception, match="--resume"):
        run(*common, "--out", tmp_path / "split")  # would overwrite the run
    run(*common, "--out", tmp_path / "split", "--resume")

    straight = checkpoints.load_pretrained(tmp_path / "straight/model.safetensors").state_dict()
    split = checkpoints.load_pretrained(tmp_path / "split/model.safetensors").state_dict()
    assert all(torch.equal(straight[key], split[key]) for key in straight)
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a, b = (torch.load(tmp_path / f"{name}/checkpoint.pt", weights_only=True)["optimizer"]
            for name in ("straight", "split"))
    assert all(torch.equal(a["state"][i]["exp_avg_sq"], b["state"][i]["exp_avg_sq"])
               for i in a["state"])


def test_two_processes_equal_one_at_the_same_global_batch(store, tmp_path):
    """torchrun with 2 gloo processes x batch 2 = 1 process x batch 4 = batch 2 x 2 accumulation.
    In float64: in float32, AdamW turns the rounding noise of gradients that are exactly 0 in
    theory (attention key biases) into steps of up to lr (5e-5 here). A high learning rate
    (peak 1.6e-3) so that the weights move far more than the tolerance."""
    common = [store, *TINY, "--max-steps", 3, "--blr", 0.1, "--precision", "fp64"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", ROOT / "train.py", *map(str, common),
                    "--batch-size", "2", "--out", tmp_path / "ddp"],
                   check=True, env=ONE_THREAD, cwd=tmp_path, timeout=240)
    run(*common, "--batch-size", 4, "--out", tmp_path / "single")
    run(*common, "--batch-size", 2, "--accum-steps", 2, "--out", tmp_path / "accum")

    single = tmp_path / "single/model.safetensors"
    assert max_difference(tmp_path / "ddp/model.safetensors", single) <= 1e-6
    assert max_difference(tmp_path / "accum/model.safetensors", single) <= 1e-6
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=1e-6)
    torch.manual_seed(0)  # the runs' initial weights: the comparison above is not trivial
    start = mae.build("mwmae-tiny", depth=1, decoder_depth=1, decoder_dim=64).state_dict()
    trained = checkpoints.load_pretrained(single).state_dict()
    assert max((trained[key] - start[key]).abs().max().item() for key in start) > 1e-3
    for name in ("ddp", "single", "accum"):
        checkpoint = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert checkpoint["scheduler"]["peak_lr"] == pytest.approx(0.1 * 4 / 256)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    """The 4th training loss is NaN: the run stops there; the step-2 checkpoint stays."""
    original, calls = mae.MAE.forward_loss, []

    def poisoned(self, x, pred, mask):
        loss = original(self, x, pred, mask)
        if self.training:
            calls.append(1)
            if len(calls) == 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(mae.MAE, "forward_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(Exception, match=r"loss is nan at step 4.*checkpoint \(step 2\) stays"):
        run(store, *TINY, "--batch-size", 4, "--max-steps", 8, "--save-every", 2, "--out", out)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    assert not (out / "model.safetensors").exists()
    assert len(losses(out)) == 3 and all(map(math.isfinite, losses(out)))


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(store, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, ROOT / "train.py", store, *TINY, "--batch-size", "4",
         "--max-steps", "10000", "--out", out],
        env=ONE_THREAD, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= step < 10000
    run(store, *TINY, "--batch-size", 4, "--max-steps", 10000, "--out", out, "--resume",
        "--stop-at", step + 1)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 1


def test_demo_run_without_data_writes_every_output(tmp_path, capsys, monkeypatch):
    """No DATA: the demo set (here 8 clips instead of 256, for time)."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    monkeypatch.setattr(data, "prepare_demo",
                        functools.partial(data.prepare_demo, n_clips=8, seconds=2.5))
    run(*TINY, "--batch-size", 4, "--max-steps", 3, "--save-every", 2, "--cache-dir", cache,
        "--out", out)
    assert "DEMO" in capsys.readouterr().out
    assert len(data.FeatureStore(cache / "demo_store")) == 8
    final = checkpoints.load_pretrained(out / "model.safetensors")
    from_checkpoint = checkpoints.load_pretrained(out / "checkpoint.pt")
    assert final.cfg == from_checkpoint.cfg and final.cfg.depth == 1
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(),
                                                 from_checkpoint.state_dict().values()))
    for step in (2, 3):
        assert (out / f"recon_step{step:07d}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "lr", "samples_per_s", "epoch"} <= records[0].keys()


def test_keep_checkpoints_keeps_a_copy_of_every_save(store, tmp_path):
    """--keep-checkpoints: checkpoint_stepNNNNNNN.pt per save, loadable as models (analyze.py
    takes several of one run); --overwrite counts them as train.py's own outputs."""
    out = tmp_path / "run"
    run(store, "--out", out, "--max-steps", 4, "--save-every", 2, "--batch-size", 4,
        "--keep-checkpoints", *TINY)
    kept = sorted(p.name for p in out.glob("checkpoint_step*.pt"))
    assert kept == ["checkpoint_step0000002.pt", "checkpoint_step0000004.pt"]
    final = checkpoints.load_pretrained(out / "checkpoint.pt")
    last = checkpoints.load_pretrained(out / kept[-1])
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), last.state_dict().values()))
    run(store, "--out", out, "--max-steps", 3, "--save-every", 3, "--batch-size", 4, "--overwrite", *TINY)
    assert not (out / kept[-1]).exists()
