"""Training on torch_xla (PJRT) against eager CPU: a few steps of train.py on both.

Run by .ci/xla.sh in its own venv (torch==2.9.0, torch_xla==2.9.0) with PJRT_DEVICE=CPU.
Checks, failing with exit status 1:
- fp32 losses of every step on XLA equal the eager CPU ones within 1e-4, and so do the
  final weights;
- an XLA run stopped after 2 steps and resumed ends with the same weights as a straight one;
- a second XLA run with another schedule compiles no new graph (the learning rate is not
  baked into the graph and every shape is fixed);
- a bf16 (autocast) XLA run trains to finite losses close to fp32.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.debug.metrics as metrics  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402

TINY = ["--set", "depth=1", "--set", "decoder_depth=1", "--set", "decoder_dim=64",
        "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1", "--workers", "0"]
TOLERANCE = 1e-4


def run(store: Path, out: Path, device: str, precision: str, steps: int, *more: str) -> list[float]:
    """Train `steps` steps; the loss of every step from metrics.jsonl."""
    train.main.main([str(store), "--out", str(out), "--device", device, "--precision", precision,
                     "--max-steps", str(steps), *TINY, *more], standalone_mode=False)
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def compiles() -> int:
    data_point = metrics.metric_data("CompileTime")
    return data_point[0] if data_point else 0


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = checkpoints.load_pretrained(a).state_dict(), checkpoints.load_pretrained(b).state_dict()
    return max((wa[key] - wb[key]).abs().max().item() for key in wa)


def main() -> int:
    # Before any backward pass: autograd sizes its device queues at the first one.
    torch_xla.device()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = data.prepare_demo(tmp / "store", n_clips=16, seconds=2.5).root
        eager = run(store, tmp / "cpu", "cpu", "fp32", steps=4)
        xla = run(store, tmp / "xla", "xla", "fp32", steps=4)
        loss_gap = max(abs(a - b) for a, b in zip(eager, xla))
        weight_gap = max_weight_difference(tmp / "cpu/model.safetensors",
                                           tmp / "xla/model.safetensors")
        print(f"eager CPU losses {eager}\nXLA losses       {xla}\n"
              f"largest loss difference {loss_gap:.2e}, weight difference {weight_gap:.2e}")
        if len(eager) != 4 or len(xla) != 4 or not loss_gap <= TOLERANCE:
            failures.append(f"XLA losses differ from eager CPU by {loss_gap:.2e} > {TOLERANCE}")
        if not weight_gap <= TOLERANCE:
            failures.append(f"XLA weights differ from eager CPU by {weight_gap:.2e}")

        run(store, tmp / "xla-split", "xla", "fp32", 4, "--stop-at", "2")
        run(store, tmp / "xla-split", "xla", "fp32", 4, "--resume")
        resume_gap = max_weight_difference(tmp / "xla/model.safetensors",
                                           tmp / "xla-split/model.safetensors")
        print(f"XLA straight vs stopped and resumed: weight difference {resume_gap:.2e}")
        if resume_gap != 0.0:
            failures.append(f"a resumed XLA run differs from a straight one by {resume_gap:.2e}")

        before = compiles()
        run(store, tmp / "xla-again", "xla", "fp32", steps=6)
        new_graphs = compiles() - before
        print(f"graphs compiled: {before} by the XLA runs above, {new_graphs} by one with "
              "another schedule")
        if new_graphs:
            failures.append(f"a second XLA run with another schedule compiled {new_graphs} graphs")

        bf16 = run(store, tmp / "xla-bf16", "xla", "bf16", steps=4)
        bf16_gap = max(abs(a - b) for a, b in zip(eager, bf16))
        print(f"XLA bf16 losses  {bf16} (largest difference to fp32 {bf16_gap:.2e})")
        if not all(torch.isfinite(torch.tensor(bf16))) or not bf16_gap < 0.05:
            failures.append(f"bf16 XLA losses {bf16} are not finite or far from fp32")
    for failure in failures:
        print("FAIL:", failure)
    print("XLA check:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
