"""train.py against bad options, bad data, foreign or busy output folders, changed settings,
corrupt checkpoints and job-wide signals (issues 11 and 12).

Errors are checked through click's test runner: one "Error: ..." line, no traceback. Runs
that need a signal, a second process or torchrun are subprocesses; all use a 1-layer model
on one CPU thread and a store of 16 synthetic clips.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mae
import train

from test_train import ONE_THREAD, ROOT, TINY, run, store  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def refused(*args) -> str:
    """Run the command, expect a refusal; its one error line."""
    result = CliRunner().invoke(train.main, [str(arg) for arg in args])
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (
        RuntimeError, ValueError, KeyError, TypeError, OSError)), result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: "), result.output
    return error


def weights_and_moments(out: Path) -> list[torch.Tensor]:
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    state = checkpoint["optimizer"]["state"]
    return [*checkpoint["model"].values(), *(state[i]["exp_avg_sq"] for i in sorted(state))]


def wait_for_metrics(out: Path, process: subprocess.Popen, lines: int = 2) -> None:
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {lines} metrics lines: {process.communicate()[0]}")


# ----------------------------------------------------------------------------- options and data

@pytest.mark.parametrize("option, value", [
    ("--batch-size", 0), ("--batch-size", -4), ("--max-steps", 0), ("--accum-steps", 0),
    ("--save-every", 0), ("--epochs", 0), ("--log-every", 0), ("--blr", 0), ("--workers", -1),
    ("--seed", -1)])
def test_nonsensical_numbers_are_refused_not_replaced_by_defaults(tmp_path, option, value):
    """(Before: `--batch-size 0` silently became the default 64 and the run went on.)"""
    error = refused(tmp_path, option, value, "--cache-dir", tmp_path / "cache",
                    "--out", tmp_path / "run")
    assert f"Invalid value for '{option}'" in error


def test_a_folder_without_audio_is_named_as_such(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    error = refused(empty, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run")
    assert error == f"Error: no audio files found under {empty}"

    text_only = tmp_path / "notes"
    text_only.mkdir()
    (text_only / "readme.txt").write_text("not audio")
    error = refused(text_only, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run2")
    assert error.startswith(f"Error: no readable audio under {text_only}: 1 file skipped")
    assert "bad_files.tsv" in error


def test_too_few_clips_for_the_batch_suggests_a_batch_size(store, tmp_path):
    error = refused(store, *TINY, "--batch-size", 64, "--out", tmp_path / "run")
    assert "16 clips" in error and "use --batch-size 16 or less" in error
    error = refused(store, *TINY, "--batch-size", 8, "--accum-steps", 4, "--out", tmp_path / "r")
    assert "use --batch-size 4 or less" in error


# ----------------------------------------------------------------------------- output folders

def test_a_foreign_or_finished_output_folder_is_refused_without_overwrite(store, tmp_path):
    common = [store, *TINY, "--batch-size", 4, "--max-steps", 3]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not empty (notes.txt)" in refused(*common, "--out", foreign)
    assert "--overwrite" in refused(*common, "--out", foreign, "--resume")

    out = tmp_path / "run"
    run(*common, "--out", out)
    (out / "checkpoint.pt").unlink()  # a finished run without its checkpoint: still not ours
    metrics = (out / "metrics.jsonl").read_text()
    assert "--overwrite" in refused(*common, "--max-steps", 4, "--out", out)
    assert (out / "metrics.jsonl").read_text() == metrics  # (before: truncated, model replaced)

    run(*common, "--max-steps", 4, "--out", out, "--overwrite")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    run(*common, "--out", foreign, "--overwrite")  # replaces only train.py's own outputs
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "model.safetensors").exists()


def test_a_checkpoint_needs_resume_or_overwrite(store, tmp_path):
    common = [store, *TINY, "--batch-size", 4, "--max-steps", 4, "--out", tmp_path / "run"]
    run(*common, "--stop-at", 2)
    error = refused(*common)
    assert "checkpoint.pt exists: pass --resume" in error and "--overwrite" in error
    assert "one of them" in refused(*common, "--resume", "--overwrite")


def test_a_second_run_on_the_same_output_folder_fails_at_once(store, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, ROOT / "train.py", store, *TINY, "--batch-size", "4",
               "--max-steps", "10000", "--out", out]
    first = subprocess.Popen(command, env=ONE_THREAD, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_metrics(out, first, lines=1)
        started = time.monotonic()
        error = refused(*command[2:], "--resume", "--stop-at", 1)
        assert "in use by another process" in error and time.monotonic() - started < 10
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM


def test_temporary_files_of_a_killed_save_are_removed_on_resume(store, tmp_path):
    out = tmp_path / "run"
    common = [store, *TINY, "--batch-size", 4, "--max-steps", 3, "--out", out]
    run(*common, "--stop-at", 1)
    leftover = out / ".checkpoint.pt.abc.tmp"
    leftover.write_bytes(b"half a checkpoint")
    run(*common, "--resume")
    assert not leftover.exists() and (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------- resuming

def test_resume_with_changed_settings_is_refused(store, tmp_path):
    out = tmp_path / "run"
    common = [store, *TINY, "--batch-size", 4, "--max-steps", 6, "--out", out]
    run(*common, "--stop-at", 2)
    error = refused(*common, "--resume", "--blr", 0.01)
    assert "with other settings: blr 0.01 (stored 0.00015)" in error
    error = refused(*common[:-4], "--max-steps", 8, "--batch-size", 2, "--out", out, "--resume",
                    "--set", "mask_ratio=0.5")
    assert "model mask_ratio 0.5 (stored 0.8)" in error and "batch_size 2 (stored 4)" in error
    assert "total_steps 8 (stored 6)" in error
    run(*common, "--resume", "--save-every", 1, "--log-every", 2)  # these may differ
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "model file"])
def test_a_corrupt_checkpoint_is_one_line_on_resume(store, tmp_path, damage):
    out = tmp_path / "run"
    common = [store, *TINY, "--batch-size", 4, "--max-steps", 4, "--out", out]
    run(*common, "--stop-at", 1)
    path = out / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "random bytes":
        path.write_bytes(os.urandom(4096))
    else:  # a readable file with a model but no training state
        torch.save(dict(config=mae.MAEConfig().to_dict(), model={}), path)
    error = refused(*common, "--resume")
    assert error.startswith("Error: cannot resume") and "checkpoint.pt" in error
    assert "weights_only" not in error


# ----------------------------------------------------------------------------- signals

def test_group_sigterm_with_workers_checkpoints_and_resumes_exactly(store, tmp_path):
    """SIGTERM to the whole process group (as SLURM, Kubernetes or `timeout` send it) with 2
    DataLoader workers: exit 143 with a checkpoint; resumed, the run equals a straight one."""
    out = tmp_path / "run"
    common = [store, *TINY, "--batch-size", "4", "--max-steps", "10000"]
    process = subprocess.Popen(
        [sys.executable, ROOT / "train.py", *map(str, common), "--workers", "2", "--out", out],
        env=ONE_THREAD, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    wait_for_metrics(out, process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 2

    run(*common, "--out", out, "--resume", "--stop-at", step + 2)
    run(*common, "--out", tmp_path / "straight", "--stop-at", step + 2)
    resumed, straight = weights_and_moments(out), weights_and_moments(tmp_path / "straight")
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight))


def test_sigterm_to_torchrun_and_its_ranks_stops_both_ranks_at_one_step(store, tmp_path):
    """A job-wide SIGTERM (SLURM's scancel signals every process of the job): each rank gets
    it twice, directly and later forwarded by torchrun (ranks run in sessions of their own). The
    ranks agree on the step, rank 0 writes the checkpoint, both exit 143 well before torchrun
    would SIGKILL them (30 s). torchrun itself exits 1 with its own SignalException traceback.
    Resumed under torchrun, the run equals a straight single-process run at the same global
    batch (float64)."""
    out = tmp_path / "ddp"
    common = [store, *TINY, "--max-steps", "10000", "--precision", "fp64"]
    process = subprocess.Popen(
        [*TORCHRUN, ROOT / "train.py", *map(str, common), "--batch-size", "2", "--out", out],
        env=ONE_THREAD, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    wait_for_metrics(out, process)
    ranks = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(ranks) == 2
    for rank in map(int, ranks):
        os.killpg(rank, signal.SIGTERM)
    time.sleep(0.5)  # torchrun's forwarded SIGTERM comes while the ranks are stopping
    os.killpg(process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    output, _ = process.communicate(timeout=120)
    assert time.monotonic() - signalled < 30  # the ranks ended by themselves (torchrun
    assert process.returncode == 1, output    # SIGKILLs them after 30 s)
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"stopped by SIGTERM at step {step};" in output, output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == step

    subprocess.run([*TORCHRUN, ROOT / "train.py", *map(str, common), "--batch-size", "2",
                    "--out", out, "--resume", "--stop-at", str(step + 2)],
                   check=True, env=ONE_THREAD, cwd=tmp_path, timeout=240)
    run(*common, "--batch-size", 4, "--out", tmp_path / "single", "--stop-at", step + 2)
    resumed, single = weights_and_moments(out), weights_and_moments(tmp_path / "single")
    assert max((a - b).abs().max().item() for a, b in zip(resumed, single)) <= 1e-6
