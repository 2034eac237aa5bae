"""--compile (torch.compile, inductor): the compiled step and encoder compute what the eager
ones do within float rounding, compile once (no recompilation at accumulation, epoch or
checkpoint boundaries), and checkpoints pass between eager and compiled runs.

Tiny models on one thread; compiling still takes minutes on a small CPU: the whole file took
about 10 minutes cold on a loaded 2-core machine and 2 minutes once inductor's on-disk cache
(/tmp/torchinductor_$USER) held its graphs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import data
import embed
import mae
import training

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(depth=1, decoder_depth=1, decoder_dim=64)
TINY_RUN = ["--set", "depth=1", "--set", "decoder_depth=1", "--set", "decoder_dim=64",
            "--workers", "0", "--warmup-steps", "2", "--log-every", "1", "--blr", "0.1",
            "--batch-size", "2", "--accum-steps", "2", "--max-steps", "6", "--save-every", "2",
            "--precision", "fp64"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# float32 unit roundoff is 6e-8. Inductor fuses and reorders the sums of LayerNorm, softmax,
# matrix products and the gradients summed over batch and tokens (up to ~1e3 terms), which
# moves each by up to ~1e3 roundoffs of its largest terms in the worst case: 1e-4 of a
# tensor's largest gradient (measured: a few 1e-6; the loss agrees to the last bit).
GRADIENT_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """8 synthetic clips of 2.5 s: 2 optimizer steps of 2 x 2 clips per epoch."""
    return data.prepare_demo(tmp_path_factory.mktemp("store"), n_clips=8, seconds=2.5).root


def loss_and_gradients(model: mae.MAE, forward, x: torch.Tensor, noise: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = forward(x, noise)[0]
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_compiled_step_equals_eager_and_compiles_once():
    """Loss and every gradient within the stated float32 tolerance; then three optimizer steps
    of two accumulated micro-batches each with torch's recompilation guard on."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = mae.build("mwmae-tiny", **TINY_MODEL)
    x, noise = torch.randn(2, 2, 200, 80), torch.rand(2, 2, 250)  # 2 micro-batches of 2 clips
    compiled = torch.compile(model, dynamic=False)  # as train.py --compile

    eager_loss, eager_grads = loss_and_gradients(model, model, x[0], noise[0])
    loss, grads = loss_and_gradients(model, compiled, x[0], noise[0])
    assert loss == pytest.approx(eager_loss, rel=LOSS_TOLERANCE)
    for name, grad in grads.items():
        scale = eager_grads[name].abs().max().item()
        assert (grad - eager_grads[name]).abs().max().item() <= GRADIENT_TOLERANCE * scale, name
    graphs = counters["stats"]["unique_graphs"]

    optimizer = training.adamw(model.param_groups(0.05), 1e-3, (0.9, 0.95), torch.device("cpu"))
    assert optimizer.param_groups[0]["fused"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            for micro in range(2):
                (compiled(x[micro], noise[micro])[0] / 2).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the first step


def run_train(*args, out: Path, command=(sys.executable,)) -> subprocess.CompletedProcess:
    """train.py in a subprocess on one thread, with torch's recompilation log on stderr."""
    return subprocess.run([*command, ROOT / "train.py", *map(str, args), "--out", out], check=True,
                          env={**ONE_THREAD, "TORCH_LOGS": "recompiles"}, cwd=out.parent,
                          timeout=600, capture_output=True, text=True)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The float64 weights in the last checkpoint (model.safetensors holds float32)."""
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def train_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory) -> Path:
    """6 eager steps of 2 micro-batches of 2 clips, in float64: in float32 AdamW turns the
    rounding noise of gradients that are 0 in theory (attention key biases) into steps of up
    to lr, so an eager and a compiled run would part by ~lr there, whatever the compiler."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_train(store, *TINY_RUN, out=out)
    torch.manual_seed(0)  # the run's initial weights: the comparisons below are not trivial
    start = mae.build("mwmae-tiny", **TINY_MODEL).state_dict()
    assert max((final_weights(out)[key] - start[key].double()).abs().max().item() for key in start) > 1e-3
    return out


def assert_same_run(out: Path, straight: Path) -> None:
    """Weights within 1e-10 (float64 roundoff is 1e-16; compiled gradients differ from eager
    by ~1e-15 relative, and six AdamW steps of lr 1.6e-3 carry that into the weights:
    measured under 1e-12); losses as logged in float32, within a few float32 roundings."""
    weights, expected = final_weights(out), final_weights(straight)
    assert list(weights) == list(expected)  # plain keys: no "_orig_mod." from compiling
    assert max((weights[key] - expected[key]).abs().max().item() for key in expected) <= 1e-10
    assert train_losses(out) == pytest.approx(train_losses(straight), rel=1e-6)


def test_resume_eager_into_compiled_and_back(store, straight, tmp_path):
    """6 steps eager straight = 2 eager, 2 compiled (--resume --compile), 2 eager (--resume)."""
    split = tmp_path / "split"
    run_train(store, *TINY_RUN, "--stop-at", 2, out=split)
    compiled = run_train(store, *TINY_RUN, "--stop-at", 4, "--resume", "--compile", out=split)
    assert "resuming" in compiled.stdout and "fp64, compiled" in compiled.stdout
    assert "Recompiling" not in compiled.stderr  # 4 micro-batches, an epoch end, a checkpoint
    run_train(store, *TINY_RUN, "--resume", out=split)
    assert_same_run(split, straight)


def test_compiled_ddp_equals_one_process(store, straight, tmp_path):
    """torchrun, 2 gloo processes x batch 2, compiled then wrapped in DDP = 1 eager process x 2
    accumulated micro-batches of 2."""
    ddp = run_train(store, *TINY_RUN, "--accum-steps", 1, "--compile", out=tmp_path / "ddp",
                    command=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2"))
    assert "x 2, fp64, compiled" in ddp.stdout
    assert "Recompiling" not in ddp.stderr
    assert_same_run(tmp_path / "ddp", straight)


def test_compiled_embeddings_equal_eager():
    """The compiled encoder forward gives the eager embeddings; the Embedder's weights (and so
    evaluate.py's cache key) are unchanged by compiling."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = mae.build("mwmae-tiny", depth=1)
    eager, compiled = embed.Embedder(model), embed.Embedder(model, compiled=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    audio = 0.1 * torch.randn(2, 16000 * 3)
    expected = embed.get_timestamp_embeddings(audio, eager)[0]
    graphs = counters["stats"]["unique_graphs"]
    got = embed.get_timestamp_embeddings(audio, compiled)[0]
    assert counters["stats"]["unique_graphs"] > graphs  # it did compile
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
