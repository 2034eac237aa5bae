"""Speed benchmarks: attention, the pretraining step, embeddings and the data pipeline.

    python bench.py                           # full run (about 10 minutes on a 2-core CPU)
    python bench.py --quick                   # about a minute: smaller batches and clips
    python bench.py --device cuda             # the same on a GPU, plus FlexAttention MW-MHA
    python bench.py --compile                 # also torch.compile (inductor) and fused AdamW
    python bench.py --json results/bench.json # also write every measurement as JSON

What is measured, all in one run:
1. attention: one decoder block (batch 64, 250 tokens, dim 384, 8 heads), forward + backward:
   standard MHA (SDPA), our MW-MHA (the "reshape" backend, plus "flex" on CUDA) and the
   official approach, every head on its own in a Python loop (`PerHeadLoopAttention`).
2. pretraining step (forward, backward, AdamW as train.py sets it up) of mae-tiny and
   mwmae-tiny at batch 32: ms/step, samples/s, and the model's FLOP rate as a fraction of the
   GEMM rate of its own matrix products (every mm/addmm of one step, recorded and replayed).
3. embeddings: real-time factor of embed.get_scene_embeddings (tiny and base) on a 60-s clip;
   peak memory of a one-hour clip (tiny), in a fresh process.
4. data: log-mel frontend real-time factor; feature-store crops/s against training samples/s.

With --compile, sections 1-3 also time the compiled path next to the eager one (train.py,
embed.py and evaluate.py --compile): the MHA and MW-MHA layer and block, the pretraining step
with fused AdamW alone and compiled with fused AdamW, and the embeddings. The first call of
each compiled candidate (compilation plus one run) is reported apart as "compile s" (less
when inductor's on-disk cache already holds the graph); the steady-state figures come after
it. The FLOP rate of a compiled step is the eager step's model FLOPs over its time, against
the GEMM rate of the eager step's matrix products.

Timing: candidates that are compared run interleaved (A, B, C, A, B, C, ...) after warm-up
and each figure is the median of the repeats, so a load change on a shared machine hits all
of them alike; ratios are taken between medians of the same run. The spread (min and max
of the repeats) is in the JSON. Nothing here is a unit test: see tests/test_bench.py.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torch.utils._python_dispatch import TorchDispatchMode

import data
import embed
import files
import mae
import training
from attention import (Attention, MultiWindowAttention, multiwindow_attention_reference, set_backend,
                       window_sizes)
from audio import SAMPLE_RATE, LogMel

aten = torch.ops.aten


@dataclass
class BenchConfig:
    """Sizes of one benchmark run (FULL is the issue's setting, QUICK the one-minute one)."""

    attn_batch: int = 64
    tokens: int = 250
    dim: int = 384
    heads: int = 8
    train_models: tuple[str, ...] = ("mae-tiny", "mwmae-tiny")
    train_batch: int = 32
    model_overrides: dict = field(default_factory=dict)  # e.g. smaller models for the tests
    embed_models: tuple[str, ...] = ("mwmae-tiny", "mwmae-base")
    embed_seconds: float = 60.0
    long_model: str = "mwmae-tiny"
    long_seconds: float = 3600.0
    frontend_seconds: float = 60.0
    store_clips: int = 64
    store_batches: int = 20
    repeats: int = 5
    warmup: int = 1
    sections: tuple[str, ...] = ("attention", "train", "embed", "data")
    compile: bool = False  # also the torch.compile'd candidates (see the module docstring)


FULL = BenchConfig()
QUICK = BenchConfig(attn_batch=8, train_batch=4, embed_seconds=4.0, long_seconds=120.0,
                    frontend_seconds=20.0, store_clips=32, store_batches=10, repeats=3)


# ----------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every candidate, `repeats` times each, run in turn (A, B, A, B, ...)
    after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: for a compiled candidate's first call, its compilation."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict:
    """Median and spread of repeated timings, in seconds."""
    return dict(median=statistics.median(seconds), min=min(seconds), max=max(seconds), runs=seconds)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


# ----------------------------------------------------------------------------- 1. attention

class PerHeadLoopAttention(nn.Module):
    """The official release's way to compute MW-MHA, as a baseline: every head on its own
    in a Python loop (attention.multiwindow_attention_reference). Shares `mw`'s parameters."""

    def __init__(self, mw: MultiWindowAttention):
        super().__init__()
        self.mw = mw

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return multiwindow_attention_reference(self.mw, x, positions)


def attention_variants(cfg: BenchConfig, device: torch.device) -> dict[str, nn.Module]:
    """The attention layers compared, MW variants with identical weights."""
    windows = window_sizes(cfg.tokens)
    if len(windows) != cfg.heads:
        raise ValueError(f"{cfg.tokens} tokens give {len(windows)} window heads, not {cfg.heads}")
    mw = MultiWindowAttention(cfg.dim, windows, cfg.tokens, backend="reshape")
    variants = {"MHA (SDPA)": Attention(cfg.dim, cfg.heads), "MW-MHA reshape": mw}
    if device.type == "cuda":
        flex = MultiWindowAttention(cfg.dim, windows, cfg.tokens, backend="flex")
        flex.load_state_dict(mw.state_dict())
        variants["MW-MHA flex"] = flex
    loop_mw = MultiWindowAttention(cfg.dim, windows, cfg.tokens)
    loop_mw.load_state_dict(mw.state_dict())
    variants["MW-MHA per-head loop"] = PerHeadLoopAttention(loop_mw)
    return {name: module.to(device) for name, module in variants.items()}


def drop_failing_flex(candidates: dict[str, Callable[[], object]], errors: dict[str, str]) -> None:
    """Run every FlexAttention candidate once; one that fails (e.g. no compiler support for
    this GPU) is reported in `errors` and left out. Failures of the other paths raise."""
    for name in [name for name in candidates if "flex" in name]:
        try:
            candidates[name]()
        except Exception as error:  # noqa: BLE001 - reported in the results, not hidden
            errors[name] = f"{type(error).__name__}: {error}"[:1000]
            del candidates[name]


def forward_backward(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        module(x).sum().backward()
    return run


def bench_attention(cfg: BenchConfig, device: torch.device) -> dict:
    """Forward + backward of the attention layer alone and of a whole ViT decoder block."""
    torch.manual_seed(0)
    variants = attention_variants(cfg, device)
    x = torch.randn(cfg.attn_batch, cfg.tokens, cfg.dim, device=device, requires_grad=True)
    errors = {}
    drop_failing_flex({name: forward_backward(m, x) for name, m in variants.items()}, errors)
    variants = {name: m for name, m in variants.items() if name not in errors}
    with torch.no_grad():  # the baselines compute the same function as our MW-MHA
        reference = variants["MW-MHA reshape"](x)
        agreement = {name: float((module(x) - reference).abs().max())
                     for name, module in variants.items() if name.startswith("MW")}
    blocks = {name: mae.ViTBlock(cfg.dim, module, 4.0).to(device) for name, module in variants.items()}
    compile_seconds = {}
    if cfg.compile:
        for name in COMPILED_ATTENTION:
            variants[f"{name} compiled"] = torch.compile(variants[name], dynamic=False)
            blocks[f"{name} compiled"] = torch.compile(blocks[name], dynamic=False)
            compile_seconds[f"{name} compiled"] = dict(
                layer=first_call_seconds(forward_backward(variants[f"{name} compiled"], x), device),
                block=first_call_seconds(forward_backward(blocks[f"{name} compiled"], x), device))
    timings = time_interleaved(
        {**{f"layer/{name}": forward_backward(m, x) for name, m in variants.items()},
         **{f"block/{name}": forward_backward(b, x) for name, b in blocks.items()}},
        cfg.repeats, cfg.warmup, device)
    rows = {}
    for name in variants:
        layer, block = summary(timings[f"layer/{name}"]), summary(timings[f"block/{name}"])
        rows[name] = dict(layer=layer, block=block, compile_s=compile_seconds.get(name))
    mha = rows["MHA (SDPA)"]
    for row in rows.values():
        row["layer_vs_mha"] = row["layer"]["median"] / mha["layer"]["median"]
        row["block_vs_mha"] = row["block"]["median"] / mha["block"]["median"]
    fused = [name for name in rows if name in ("MW-MHA reshape", "MW-MHA flex")]
    fastest = min(fused, key=lambda name: rows[name]["block"]["median"])
    return dict(shape=dict(batch=cfg.attn_batch, tokens=cfg.tokens, dim=cfg.dim, heads=cfg.heads,
                           windows=window_sizes(cfg.tokens)),
                rows=rows, max_abs_diff_vs_reshape=agreement, fastest_mw_backend=fastest,
                errors=errors)


COMPILED_ATTENTION = ("MHA (SDPA)", "MW-MHA reshape")


# ----------------------------------------------------------------------------- 2. training

class GemmRecorder(TorchDispatchMode):
    """Records every mm / addmm (shapes, strides, dtype) that runs inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.mm.default, aten.addmm.default):
            self.calls.append((func, [(a.shape, a.stride(), a.dtype) for a in args], kwargs or {}))
        return func(*args, **(kwargs or {}))


def gemm_replay(calls: list, device: torch.device) -> tuple[Callable[[], None], int]:
    """A function that runs the recorded matrix products again on random matrices of the same
    shapes and memory layouts, and the FLOPs it does (2 m k n per product)."""
    def random_like(shape, stride, dtype):  # strides may be 0 (expanded gradients)
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
        return torch.randn(size, dtype=dtype, device=device).as_strided(shape, stride)

    operands = [(func, [random_like(*spec) for spec in specs], kwargs) for func, specs, kwargs in calls]
    flops = 0
    for func, tensors, _ in operands:
        a, b = tensors[-2:]
        flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]

    def replay():
        for func, tensors, kwargs in operands:
            func(*tensors, **kwargs)
    return replay, flops


def sdpa_forward_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # q k^T and p v


def sdpa_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return 2 * sdpa_flop_count(query, key, value)  # model FLOPs: a kernel's recompute not counted


# torch's FlopCounterMode does not know SDPA's fused CPU kernel, and counts the recomputed
# scores in the CUDA kernels' backward. Here every attention backward is twice its forward, as
# for every other product, so fused kernels and the explicit matmuls of windowed heads count alike.
ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_forward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flops,
    aten._scaled_dot_product_flash_attention_backward: sdpa_backward_flops,
    aten._scaled_dot_product_efficient_attention_backward: sdpa_backward_flops,
    aten._scaled_dot_product_cudnn_attention_backward: sdpa_backward_flops,
}


def training_step(model: mae.MAE, batch: torch.Tensor, compiled: bool = False,
                  fused: bool = False) -> Callable[[], None]:
    """Forward, backward and AdamW step, set up as train.py does (fp32 on CPU, bf16 autocast
    on CUDA, no weight decay on biases, norms, tokens and position tables). fused: train.py's
    AdamW (training.adamw: fused on CPU and CUDA), else torch's default (train.py before it);
    compiled: as train.py --compile."""
    optimizer = (training.adamw(model.param_groups(0.05), 1e-4, (0.9, 0.95), batch.device) if fused else
                 torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95)))
    autocast = torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=batch.is_cuda)
    forward = torch.compile(model, dynamic=False) if compiled else model

    def step():
        with autocast:
            loss, _, _ = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_training(cfg: BenchConfig, device: torch.device) -> dict:
    """ms/step and FLOP rate of each model, with the GEMM rate of its own matrix products."""
    torch.manual_seed(0)
    batch = torch.randn(cfg.train_batch, 200, 80, device=device)
    models = {name: mae.build(name, **cfg.model_overrides).to(device) for name in cfg.train_models}
    if device.type == "cuda":  # the fused FlexAttention decoder next to the reshape one
        for name in [n for n in models if models[n].cfg.decoder_multiwindow]:
            models[f"{name} (flex)"] = mae.build(name, **cfg.model_overrides).to(device)
            set_backend(models[f"{name} (flex)"], "flex")
    steps = {name: training_step(model, batch) for name, model in models.items()}
    errors = {}
    drop_failing_flex(steps, errors)  # (its first step is done here)
    models = {name: model for name, model in models.items() if name not in errors}
    flops, replays = {}, {}
    for name, step in steps.items():
        if "flex" not in name:
            step()  # the first step allocates the optimizer state
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            with GemmRecorder() as recorder:
                step()
        flops[name] = counter.get_total_flops()
        replays[name] = gemm_replay(recorder.calls, device)
    base = {name: name for name in steps}  # row -> the model whose FLOPs and GEMMs it has
    compile_seconds = {}
    if cfg.compile:
        for name in [n for n in models if "(flex)" not in n]:
            steps[f"{name} fused AdamW"] = training_step(models[name], batch, fused=True)
            steps[f"{name} compiled"] = training_step(models[name], batch, compiled=True, fused=True)
            compile_seconds[f"{name} compiled"] = first_call_seconds(steps[f"{name} compiled"], device)
            base.update({f"{name} fused AdamW": name, f"{name} compiled": name})
    candidates = {**{f"step/{n}": s for n, s in steps.items()},
                  **{f"gemm/{n}": replay for n, (replay, _) in replays.items()}}
    timings = time_interleaved(candidates, cfg.repeats, cfg.warmup, device)
    rows = {}
    for name, model_name in base.items():
        step_time = summary(timings[f"step/{name}"])
        gemm_time = summary(timings[f"gemm/{model_name}"])
        gemm_flops = replays[model_name][1]
        model_rate = flops[model_name] / step_time["median"]
        gemm_rate = gemm_flops / gemm_time["median"]
        eager_time = statistics.median(timings[f"step/{model_name}"])
        rows[name] = dict(step=step_time, ms_per_step=1e3 * step_time["median"],
                          samples_per_s=cfg.train_batch / step_time["median"],
                          gflop_per_step=flops[model_name] / 1e9, model_gflop_per_s=model_rate / 1e9,
                          gemm_gflop=gemm_flops / 1e9, gemm=gemm_time,
                          gemm_gflop_per_s=gemm_rate / 1e9, fraction_of_gemm_rate=model_rate / gemm_rate,
                          gemm_share_of_step=gemm_time["median"] / step_time["median"],
                          speedup_over_eager=eager_time / step_time["median"],
                          compile_s=compile_seconds.get(name))
    result = dict(batch=cfg.train_batch, overrides=cfg.model_overrides, rows=rows, errors=errors)
    mw_names = [n for n in models if models[n].cfg.decoder_multiwindow and "(flex)" not in n]
    plain = [n for n in models if not models[n].cfg.decoder_multiwindow]
    if mw_names and plain:
        result["mw_over_mae"] = rows[mw_names[0]]["ms_per_step"] / rows[plain[0]]["ms_per_step"]
        if cfg.compile:
            result["mw_over_mae_compiled"] = (rows[f"{mw_names[0]} compiled"]["ms_per_step"] /
                                              rows[f"{plain[0]} compiled"]["ms_per_step"])
    return result


# ----------------------------------------------------------------------------- 3. embeddings

def noise_clip(seconds: float, seed: int = 0) -> torch.Tensor:
    """(1, samples) of quiet noise: the embedding cost does not depend on the content."""
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(1, int(seconds * SAMPLE_RATE), generator=generator)


def memory_status() -> dict[str, float]:
    """Resident memory of this process in MiB: now (VmRSS) and its peak (VmHWM); Linux only."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM") if key in fields}


def reset_peak_memory() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0); harmless where it is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_worker(model_name: str, seconds: float, device: str, threads: int, queue) -> None:
    """In a fresh process: scene embedding of one long clip; reports its peak memory."""
    torch.set_num_threads(threads)
    model = embed.load_model(model_name).to(device)
    audio = noise_clip(seconds).to(device)
    reset_peak_memory()
    before = memory_status()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    embed.get_scene_embeddings(audio, model)
    elapsed = time.perf_counter() - start
    after = memory_status()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    queue.put(dict(peak_rss_mb=after.get("VmHWM"), rss_before_mb=before.get("VmRSS"),
                   audio_mb=audio.numel() * 4 / 2**20, gpu_peak_mb=gpu,
                   wall_seconds=elapsed, real_time_factor=seconds / elapsed))


def measure_peak_memory(model_name: str, seconds: float, device: torch.device) -> dict:
    """peak_memory_worker in a fresh process: what this process has allocated and freed before
    does not hide the memory the call needs."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=peak_memory_worker,
                             args=(model_name, seconds, str(device), torch.get_num_threads(), queue))
    worker.start()
    result = queue.get()
    worker.join()
    return result


def bench_embeddings(cfg: BenchConfig, device: torch.device) -> dict:
    """Real-time factor of get_scene_embeddings per model; peak memory of a long clip."""
    audio = noise_clip(cfg.embed_seconds).to(device)
    models = {name: embed.load_model(name).to(device) for name in cfg.embed_models}
    candidates = {name: (lambda m=model: embed.get_scene_embeddings(audio, m)) for name, model in models.items()}
    compile_seconds = {}
    if cfg.compile:
        for name, model in list(models.items()):
            compiled = embed.Embedder(model.mae, compiled=True).to(device)
            candidates[f"{name} compiled"] = lambda m=compiled: embed.get_scene_embeddings(audio, m)
            compile_seconds[f"{name} compiled"] = first_call_seconds(candidates[f"{name} compiled"], device)
    timings = time_interleaved(candidates, cfg.repeats, cfg.warmup, device)
    rows = {name: dict(time=summary(t), real_time_factor=cfg.embed_seconds / statistics.median(t),
                       compile_s=compile_seconds.get(name))
            for name, t in timings.items()}
    long_clip = measure_peak_memory(cfg.long_model, cfg.long_seconds, device)
    return dict(clip_seconds=cfg.embed_seconds, rows=rows,
                long_clip=dict(model=cfg.long_model, seconds=cfg.long_seconds, **long_clip))


# ----------------------------------------------------------------------------- 4. data

def bench_data(cfg: BenchConfig, device: torch.device, train_samples_per_s: float | None) -> dict:
    """Log-mel frontend real-time factor; random crops/s from a feature store (DEMO clips)."""
    frontend = LogMel().to(device)
    audio = noise_clip(cfg.frontend_seconds).to(device)
    with torch.no_grad():
        frontend_time = time_interleaved({"logmel": lambda: frontend(audio)},
                                         cfg.repeats, cfg.warmup, device)["logmel"]
    with tempfile.TemporaryDirectory() as tmp:
        store = data.prepare_demo(Path(tmp) / "store", n_clips=cfg.store_clips, seconds=4.0)
        dataset = data.CropDataset(store)
        batch = min(32, cfg.store_clips)
        crops = [data.measure_crops_per_second(dataset, batch, workers=0, batches=cfg.store_batches)
                 for _ in range(cfg.repeats)]
    result = dict(frontend=dict(clip_seconds=cfg.frontend_seconds, time=summary(frontend_time),
                                real_time_factor=cfg.frontend_seconds / statistics.median(frontend_time)),
                  store=dict(crops_per_s=statistics.median(crops), runs=crops, batch=batch,
                             workers=0, clips=cfg.store_clips))
    if train_samples_per_s:
        result["store"]["train_samples_per_s"] = train_samples_per_s
        result["store"]["crops_over_samples"] = result["store"]["crops_per_s"] / train_samples_per_s
    return result


# ----------------------------------------------------------------------------- the run

def machine() -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return dict(cpu=cpu, cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def run_benchmarks(cfg: BenchConfig, device: torch.device, echo: Callable[[str], None] = print) -> dict:
    """Every section of `cfg.sections`, in order; the results as one JSON-ready dict."""
    results = dict(machine=machine(), device=str(device), config=dataclasses.asdict(cfg),
                   load_average=dict(start=load_average()))
    if "attention" in cfg.sections:
        echo("1/4 attention ...")
        results["attention"] = bench_attention(cfg, device)
    if "train" in cfg.sections:
        echo("2/4 pretraining step ...")
        results["train"] = bench_training(cfg, device)
    if "embed" in cfg.sections:
        echo("3/4 embeddings ...")
        results["embed"] = bench_embeddings(cfg, device)
    if "data" in cfg.sections:
        echo("4/4 data ...")
        rows = results.get("train", {}).get("rows", {})
        mw = [row["samples_per_s"] for name, row in rows.items() if name.startswith("mwmae")]
        results["data"] = bench_data(cfg, device, mw[0] if mw else None)
    results["load_average"]["end"] = load_average()
    results["targets"] = check_targets(results)
    return results


def check_targets(results: dict) -> list[dict]:
    """The issue's targets for a 2-core CPU, each with the measured value and whether it is met."""
    targets = []

    def add(name: str, value: float | None, goal: float, higher_is_better: bool = True):
        if value is not None:
            met = value >= goal if higher_is_better else value <= goal
            targets.append(dict(target=name, value=value, goal=goal, met=met))

    train_rows = results.get("train", {}).get("rows", {})
    add("MW-MAE step / MAE step <= 1.00", results.get("train", {}).get("mw_over_mae"), 1.0, False)
    add("MW-MAE compiled step / MAE compiled step <= 1.00",
        results.get("train", {}).get("mw_over_mae_compiled"), 1.0, False)
    for name, row in train_rows.items():
        if name.endswith(" compiled"):
            add(f"{name}: step >= 1.3x eager", row["speedup_over_eager"], 1.3)
    for name, row in train_rows.items():
        add(f"{name}: model FLOP/s >= 90% of GEMM rate", row["fraction_of_gemm_rate"], 0.9)
    for name, row in results.get("embed", {}).get("rows", {}).items():
        if name.endswith("base"):
            add(f"{name} embeddings >= 5x real time", row["real_time_factor"], 5.0)
    frontend = results.get("data", {}).get("frontend")
    add("log-mel frontend >= 1000x real time", frontend and frontend["real_time_factor"], 1000.0)
    add("store crops/s >= 10x training samples/s",
        results.get("data", {}).get("store", {}).get("crops_over_samples"), 10.0)
    return targets


def format_report(results: dict) -> str:
    """The human-readable table."""
    m = results["machine"]
    lines = [f"MW-MAE benchmarks on {results['device']}: {m['cpu']} ({m['cpus']} CPUs, "
             f"{m['threads']} torch threads){', ' + m['gpu'] if m['gpu'] else ''}, torch {m['torch']}",
             f"load average (1, 5, 15 min) at start {results['load_average']['start']}, "
             f"at end {results['load_average']['end']}; medians of {results['config']['repeats']} "
             f"interleaved repeats after {results['config']['warmup']} warm-up"]
    if "attention" in results:
        a = results["attention"]
        s = a["shape"]
        lines += ["", f"[1] attention, forward + backward: batch {s['batch']}, {s['tokens']} tokens, "
                      f"dim {s['dim']}, {s['heads']} heads, windows {s['windows']}",
                  f"    {'variant':<33}{'block ms':>10}{'vs MHA':>8}{'layer ms':>10}{'vs MHA':>8}"
                  f"{'compile s (block, layer)':>26}"]
        for name, row in a["rows"].items():
            compile_s = row.get("compile_s")
            lines.append(f"    {name:<33}{1e3 * row['block']['median']:>10.1f}{row['block_vs_mha']:>8.2f}"
                         f"{1e3 * row['layer']['median']:>10.1f}{row['layer_vs_mha']:>8.2f}"
                         + (f"{compile_s['block']:>16.1f}, {compile_s['layer']:.1f}" if compile_s else ""))
        lines += [f"    left out {name}: {error}" for name, error in a["errors"].items()]
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in a["max_abs_diff_vs_reshape"].items() if "reshape" not in k)
        lines.append(f"    block = pre-LN ViT block (attention + MLP); layer = the attention alone. "
                     f"Max |output - reshape|: {diffs}. Fastest MW backend: {a['fastest_mw_backend']}")
    if "train" in results:
        t = results["train"]
        lines += ["", f"[2] pretraining step (forward + backward + AdamW), batch {t['batch']}"
                      f"{', overrides ' + str(t['overrides']) if t['overrides'] else ''}",
                  f"    {'model':<29}{'ms/step':>9}{'samples/s':>11}{'GFLOP/step':>12}{'GFLOP/s':>9}"
                  f"{'GEMM GFLOP/s':>14}{'fraction':>10}{'GEMM share':>12}{'vs eager':>10}{'compile s':>11}"]
        for name, row in t["rows"].items():
            lines.append(f"    {name:<29}{row['ms_per_step']:>9.0f}{row['samples_per_s']:>11.2f}"
                         f"{row['gflop_per_step']:>12.1f}{row['model_gflop_per_s']:>9.1f}"
                         f"{row['gemm_gflop_per_s']:>14.1f}{row['fraction_of_gemm_rate']:>10.2f}"
                         f"{row['gemm_share_of_step']:>12.2f}{row['speedup_over_eager']:>10.2f}"
                         + (f"{row['compile_s']:>11.1f}" if row["compile_s"] is not None else ""))
        lines += [f"    left out {name}: {error}" for name, error in t["errors"].items()]
        if "mw_over_mae" in t:
            lines.append(f"    MW-MAE step / MAE step: {t['mw_over_mae']:.2f}"
                         + (f"; compiled: {t['mw_over_mae_compiled']:.2f}" if "mw_over_mae_compiled" in t else ""))
        lines.append("    fraction = model FLOP/s / GEMM FLOP/s, the GEMM rate of replaying the (eager) step's own "
                     "mm/addmm calls; GEMM share = replay time / step time; vs eager = eager step time (torch's "
                     "default AdamW) / this step time; compile s = the first compiled step")
    if "embed" in results:
        e = results["embed"]
        lines += ["", f"[3] embeddings: get_scene_embeddings of a {e['clip_seconds']:g}-s clip"]
        for name, row in e["rows"].items():
            compile_s = row.get("compile_s")
            lines.append(f"    {name:<20}{1e3 * row['time']['median']:>9.0f} ms  "
                         f"{row['real_time_factor']:>8.1f}x real time"
                         + (f"  (compile {compile_s:.1f} s)" if compile_s is not None else ""))
        lc = e["long_clip"]
        gpu = f", GPU peak {lc['gpu_peak_mb']:.0f} MB" if lc["gpu_peak_mb"] is not None else ""
        memory = (f"peak RSS {lc['peak_rss_mb']:.0f} MiB (before the call {lc['rss_before_mb']:.0f} MiB, "
                  f"of which audio {lc['audio_mb']:.0f} MiB)" if lc["peak_rss_mb"] else "peak RSS unknown")
        lines.append(f"    {lc['model']}, {lc['seconds'] / 60:g}-min clip in a fresh process: {memory}"
                     f"{gpu}; {lc['real_time_factor']:.1f}x real time")
    if "data" in results:
        d = results["data"]
        f, st = d["frontend"], d["store"]
        lines += ["", "[4] data",
                  f"    log-mel frontend, {f['clip_seconds']:g}-s clip: {1e3 * f['time']['median']:.1f} ms, "
                  f"{f['real_time_factor']:.0f}x real time",
                  f"    feature store: {st['crops_per_s']:.0f} crops/s (batch {st['batch']}, "
                  f"{st['workers']} workers)" + (f" vs {st['train_samples_per_s']:.2f} training samples/s: "
                                                 f"{st['crops_over_samples']:.0f}x"
                                                 if "crops_over_samples" in st else "")]
    if results["targets"]:
        lines += ["", "Targets (set for the 2-core CPU):"]
        for t in results["targets"]:
            lines.append(f"    {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['value']:.2f}")
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="The one-minute version: smaller batches and clips.")
@click.option("--device", type=mae.DeviceChoice(("cpu", "cuda")), default="cpu", show_default=True,
              help="cpu, cuda or cuda:N.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice).")
@click.option("--only", "sections", multiple=True, type=click.Choice(FULL.sections),
              help="Run only these sections (repeatable).")
@click.option("--compile", "compiled", is_flag=True,
              help="Also time the torch.compile'd layers, training step (with fused AdamW) and embeddings.")
def main(quick: bool, device: torch.device, json_path: str | None, threads: int | None, sections: tuple[str, ...],
         compiled: bool):
    """Benchmark attention, the pretraining step, embeddings and the data pipeline."""
    if threads:
        torch.set_num_threads(threads)
    cfg = QUICK if quick else FULL
    if sections:
        cfg = dataclasses.replace(cfg, sections=sections)
    if compiled:
        cfg = dataclasses.replace(cfg, compile=True)
    results = run_benchmarks(cfg, device, echo=lambda msg: click.echo(msg, err=True))
    click.echo(format_report(results))
    if json_path:
        files.atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
        click.echo(f"wrote {json_path}", err=True)


if __name__ == "__main__":
    main()
