"""What a training run needs besides its model and data, shared by train.py (pretraining) and
finetune.py: the device and process group, the learning-rate schedule, checkpoints that resume
bit for bit (random generator states, atomic saves), and stopping cleanly on SIGINT/SIGTERM
with every process at the same step."""
import contextlib
import json
import math
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import files


# ----------------------------------------------------------------------------- device, schedule

def setup_device(device: torch.device) -> tuple[torch.device, int, int]:
    """This process's device and (rank, world size); started by torchrun, it joins the process
    group and takes CUDA device LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 or device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        if device.type == "xla":
            import torch_xla.distributed.xla_backend  # noqa: F401 - registers the "xla" backend
            dist.init_process_group("xla", init_method="xla://")
        else:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then half a cosine down to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float],
          device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`. On CPU and CUDA torch's fused kernel updates every parameter
    in one call (the same update as the per-parameter loop up to float rounding); elsewhere
    (XLA) torch's default. A resumed optimizer keeps the implementation stored in its
    checkpoint (torch's load_state_dict restores it), so an old run continues as it began."""
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)


# ----------------------------------------------------------------------------- checkpoints

def rng_states() -> dict:
    """Global generator states as tensors and plain containers (torch.load(weights_only=True))."""
    numpy_state = np.random.get_state()
    states = dict(torch=torch.get_rng_state(), python=random.getstate(),
                  numpy=[numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                         *numpy_state[2:]])
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def to_cpu(state):
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: to_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(value) for value in state)
    return state


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    state = to_cpu(checkpoint)
    files.atomic_write(path, lambda tmp: torch.save(state, tmp))


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (by a run that died after its last checkpoint)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        files.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{x}\n" for x in lines)))


# ----------------------------------------------------------------------------- stopping, several processes

@contextlib.contextmanager
def stop_requests():
    """While active, SIGINT and SIGTERM only append their number to the yielded list (the
    loop then stops after the current step with a checkpoint). A second SIGINT acts as usual
    (Ctrl-C twice interrupts at once); further SIGTERMs are ignored, as a job's processes
    often get several (from the scheduler and from torchrun, which forwards its own).
    Handlers are restored on exit."""
    received, previous = [], {}

    def request_stop(signum, frame):
        received.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, request_stop)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def any_process(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true in any process (so that all of them stop at the same step)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_processes(value: torch.Tensor) -> float:
    if dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value.item()
