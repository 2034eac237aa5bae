"""Pretrain a masked autoencoder (MW-MAE, MAE, AudioMAE++) on audio, top to bottom in one loop.

    python train.py                                       # DEMO: synthetic sounds, minutes on a CPU
    python train.py AUDIO_DIR... --model mwmae-base --out runs/base --epochs 100 --batch-size 64
    python train.py STORE --resume --out runs/base        # continue exactly where it stopped
    torchrun --nproc_per_node 8 train.py STORE ...        # several GPUs or nodes (DDP)
    PJRT_DEVICE=TPU python train.py STORE --device xla    # TPU through torch_xla

DATA is audio folders (their log-mel is computed once into a feature store under --cache-dir,
see data.py), a store directory made by `python data.py prepare`, or webdataset tar shards
from `python data.py shards` for several hosts (see shards.py): their folder, or URLs and
brace patterns (`/data/shards/{000000..000999}.tar`, `pipe:gcloud storage cat gs://b/{...}.tar`)
with shards.json beside them. Without DATA the run uses the built-in DEMO set of synthetic
sounds and small defaults.

Recipe (paper defaults): AdamW, betas (0.9, 0.95), weight decay 0.05 except on biases, norms,
tokens and position tables; lr = blr * global batch / 256 with global batch = batch size x
accumulation steps x processes; linear warm-up, then cosine decay to 0, set every step.
The mask ratio comes from the model config (0.8). bf16 autocast on CUDA and XLA, fp32 on CPU.

Exactness: the crop of clip i and its mask noise depend only on (seed, epoch, i), and the
sampler splits each global batch across processes. A run therefore does the same arithmetic
(up to float summation order) with any number of processes at the same global batch, and a
resumed run continues bit for bit.

Outputs in --out:
    checkpoint.pt        latest state (model config and weights, optimizer, schedule, step,
                         RNG states, data position), replaced atomically every --save-every steps,
                         on SIGINT/SIGTERM and at the end; read it with
                         torch.load(weights_only=True) or checkpoints.load_pretrained
    recon_step*.png      input log-mel, masked input and reconstruction at every checkpoint
    checkpoint_step*.pt  with --keep-checkpoints: a copy of every checkpoint (analyze.py takes them)
    metrics.jsonl        one JSON object per logged step: step, epoch, loss, lr, samples/s, time
    model.safetensors    the final weights and config (checkpoints.load_pretrained; embed.py takes it)
--out is locked for the run (a second process on it fails at once) and must be new or empty,
hold this command's run (--resume; changed settings are refused) or be --overwrite'n.
SIGINT/SIGTERM to the whole job (DataLoader workers leave them to the main process; under
torchrun all ranks stop at the same step): checkpoint, then exit 130/143.
"""
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import data
import files
import mae
import shards
import training

MASK_STREAM = 0x6D61736B  # keeps the mask noise apart from data.py's crop randomness
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "model.safetensors"
POSITIVE = click.IntRange(1)
BETA = click.FloatRange(0, 1, max_open=True)
RUN_STATE = ("config", "model", "optimizer", "step", "rng", "data")  # what --resume needs

# Without DATA: the DEMO set and a model and schedule small enough for a laptop CPU.
# Warm-up: 10 epochs as in the papers (of 100); the DEMO warms up over 10% of its steps, and
# its small batch learns visibly faster in 300 steps with a 10x base lr.
DEMO = dict(overrides=("depth=2", "decoder_depth=1", "decoder_dim=128"), batch_size=16,
            max_steps=300, warmup_epochs=None, save_every=100, blr=1.5e-3)
DEFAULTS = dict(overrides=(), batch_size=64, max_steps=None, warmup_epochs=10.0, save_every=1000,
                blr=1.5e-4)


# ----------------------------------------------------------------------------- setup

def model_overrides(items: tuple[str, ...]) -> dict:
    """--set FIELD=VALUE items -> config overrides (mae.parse_overrides), as a CLI error."""
    try:
        return mae.parse_overrides(items)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error


def open_store(paths: tuple[str, ...], cache_dir: Path, workers: int) -> data.FeatureStore:
    """The feature store of DATA (or of the DEMO set). The first process of each machine
    prepares it while the others wait, then everyone opens it. A store that cannot be made
    or read, or that holds no clip, is a one-line error."""
    def prepare():
        try:
            if not paths:
                return data.prepare_demo(cache_dir / "demo_store", workers=workers)
            return data.open_or_prepare_store(paths, cache_dir / "stores", workers=workers)
        except (ValueError, OSError) as error:
            raise click.ClickException(str(error)) from None

    if dist.is_initialized():
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            prepare()
        dist.barrier()
    store = prepare()  # in a distributed run: already complete, only opens it
    if len(store) == 0:
        raise click.ClickException(no_clips_message(store, paths))
    return store


def no_clips_message(store: data.FeatureStore, paths: tuple[str, ...]) -> str:
    """Why a store is empty: nothing that looked like a file, or only unreadable files."""
    where = ", ".join(files.shown(path) for path in paths)
    bad = len(data.read_bad_files(store.root))
    if bad:
        return (f"no readable audio under {where}: {bad} file{'s' * (bad != 1)} skipped, "
                f"see {files.shown(store.root / data.BAD_FILE)}")
    if len(paths) == 1 and data.FeatureStore.is_store(paths[0]):
        return f"the store {where} holds no clips"
    return f"no audio files found under {where}"


class DataPath(click.Path):
    """An existing path, or webdataset shard URLs / a brace pattern (shards.is_shard_url) as is."""

    def convert(self, value, param, ctx):
        return value if shards.is_shard_url(value) else super().convert(value, param, ctx)


def open_shards(sources: tuple[str, ...], batch_size: int, accum_steps: int, workers: int,
                seed: int, crop_frames: int, pin_memory: bool) -> shards.ShardLoader:
    """The loader of shard DATA (see shards.py); problems are one-line errors."""
    try:
        loader = shards.make_shard_loader(shards.open_shard_set(sources), batch_size, workers,
                                          seed, crop_frames, pin_memory=pin_memory)
    except (ValueError, OSError, ImportError) as error:
        raise click.ClickException(str(error)) from None
    if len(loader) < accum_steps:
        raise click.ClickException(f"the shards give {len(loader)} micro-batches per epoch, "
                                   f"fewer than --accum-steps {accum_steps}")
    return loader


def check_enough_clips(clips: int, world: int, batch_size: int, accum_steps: int) -> None:
    """One optimizer step needs batch size x accumulation steps clips in every process."""
    per_process = clips // world
    if per_process >= batch_size * accum_steps:
        return
    fits = per_process // accum_steps
    advice = (f"use --batch-size {fits} or less" if fits else
              f"use --accum-steps {per_process} or less" if per_process else "use fewer processes")
    raise click.ClickException(
        f"{clips} clips over {world} process{'es' * (world != 1)} do not fill one optimizer step "
        f"of batch {batch_size} x {accum_steps} accumulation step{'s' * (accum_steps != 1)}: "
        f"{advice}")


# ----------------------------------------------------------------------------- data

def mask_noise(indices: torch.Tensor, seed: int, epoch: int, num_patches: int) -> torch.Tensor:
    """Uniform noise that decides the masks (B,) -> (B, L): a function of (seed, epoch, clip)
    only, so a sample gets the same mask whichever process or micro-batch it lands in."""
    rows = [np.random.default_rng([MASK_STREAM, seed, epoch, int(i)]).random(num_patches)
            for i in indices]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def micro_batches(loader: data.EpochLoader, seed: int, epoch: int, skip: int, per_epoch: int,
                  num_patches: int):
    """Endless (crops (B, T, F), noise (B, L)), starting at micro-batch `skip` of `epoch`.
    Each epoch yields `per_epoch` micro-batches (whole optimizer steps; the rest is dropped).
    Skipped micro-batches of a resumed epoch are still read from the loader, not used.
    The loader gives each crop's clip index with it (data.CropDataset), which the mask noise
    is drawn from."""
    while True:
        for crops, clips in loader.epoch_batches(epoch, skip, per_epoch):
            yield crops, mask_noise(clips, seed, epoch, num_patches)
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- run folder

def own_outputs(out: Path) -> list[str]:
    """The names train.py writes in --out (OutputFolder takes names, so the figures are listed)."""
    kept = [*out.glob("recon_step*.png"), *out.glob("checkpoint_step*.pt")]
    return [CHECKPOINT, METRICS, FINAL, *sorted(path.name for path in kept)]


def claim_output(out: Path, resume: bool, overwrite: bool) -> files.OutputFolder:
    """Lock --out for this run (a second process on it fails at once) and keep runs apart: a
    non-empty folder is taken with --resume when it holds this command's run (a checkpoint,
    or only train.py's outputs: killed before its first checkpoint), or with --overwrite,
    which deletes the outputs of the earlier run. Leftover temporary files are removed."""
    if resume and overwrite:
        raise click.ClickException("--resume continues the run in --out and --overwrite "
                                   "replaces it: pass one of them")
    has_checkpoint = (out / CHECKPOINT).is_file()
    resumable = resume and (has_checkpoint or out.is_dir() and files.holds_only(out, own_outputs(out)))
    try:
        folder = files.OutputFolder(out, own=own_outputs(out), overwrite=overwrite,
                                    resumable=resumable or has_checkpoint and not overwrite)
    except files.OutputError as error:
        raise click.ClickException(str(error)) from None
    if has_checkpoint and not (resume or overwrite):
        folder.release()
        raise click.ClickException(f"{files.shown(out / CHECKPOINT)} exists: pass --resume to "
                                   "continue that run, --overwrite to start a new one there, "
                                   "or choose another --out")
    return folder


def read_run_checkpoint(path: Path) -> dict:
    """The training checkpoint to resume from; a file that is not one is a one-line error."""
    try:
        checkpoint = checkpoints.read_checkpoint(path)
    except checkpoints.CheckpointError as error:
        raise click.ClickException(f"cannot resume: {error}") from None
    missing = [key for key in RUN_STATE if key not in checkpoint]
    if missing:
        raise click.ClickException(f"cannot resume: {files.shown(path)} is not a training "
                                   f"checkpoint (it has no {', '.join(missing)})")
    return checkpoint


@contextlib.contextmanager
def restoring(path: Path):
    """Turn a checkpoint whose contents do not fit (wrong shapes, bad entries) into one line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise click.ClickException(f"cannot resume from {files.shown(path)}: "
                                   f"{type(error).__name__} {reason}") from None


def changed_settings(checkpoint: dict, cfg: mae.MAEConfig, settings: dict, layout: dict) -> list[str]:
    """What differs between this command and the run stored in `checkpoint`, as
    'NAME NOW (stored THEN)': the model config, the data layout (clips, global batch, steps
    per epoch) and, where the checkpoint has them (older ones do not), the run settings."""
    stored = {**{f"model {key}": value for key, value in checkpoint["config"].items()},
              **checkpoint["data"], **checkpoint.get("settings", {})}
    current = {**{f"model {key}": value for key, value in cfg.to_dict().items()},
               **layout, **settings}
    return [f"{name} {value!r} (stored {stored[name]!r})" for name, value in current.items()
            if name in stored and as_stored(stored[name]) != as_stored(value)]


def as_stored(value):
    """Tuples and lists compare equal (a config holds tuples, a JSON round trip gives lists)."""
    return list(value) if isinstance(value, (tuple, list)) else value


# ----------------------------------------------------------------------------- figures

def save_reconstruction(model: mae.MAE, x: torch.Tensor, noise: torch.Tensor, path: Path,
                        title: str) -> None:
    """PNG of one example x (1, T, F): input | masked input | reconstruction (the predicted
    masked patches pasted between the visible ones)."""
    model.eval()
    with torch.no_grad():
        loss, pred, mask = model(x, noise)
    model.train()
    patches, masked = model.patchify(x), mask[..., None].bool()  # (1, L, P), (1, L, 1)
    panels = {"input": x,
              f"masked input ({model.cfg.mask_ratio:.0%} hidden)": model.unpatchify(
                  patches.masked_fill(masked, float("nan"))),
              f"reconstruction (loss {loss.item():.3f})": model.unpatchify(
                  torch.where(masked, pred, patches))}
    figure = Figure(figsize=(15, 3.5), layout="constrained")
    axes = figure.subplots(1, 3, sharey=True)
    low, high = np.percentile(x.cpu().numpy(), [1, 99])
    colours = colormaps["magma"].with_extremes(bad="0.8")  # masked patches (NaN) in grey
    for ax, (name, image) in zip(axes, panels.items()):
        ax.imshow(image[0].T.float().cpu().numpy(), origin="lower", aspect="auto",
                  cmap=colours, vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("frame (10 ms)")
    axes[0].set_ylabel("mel bin")
    figure.suptitle(title)
    files.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))


# ----------------------------------------------------------------------------- command

@click.command(context_settings=dict(show_default=True))
@click.argument("data_paths", metavar="[DATA|STORE|SHARDS]...", nargs=-1, type=DataPath(exists=True))
@click.option("--model", "model_name", default="mwmae-tiny", type=click.Choice(mae.PRESETS))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Model config override, e.g. --set depth=4 --set decoder_dim=256. "
                   f"[DEMO default: {' '.join(DEMO['overrides'])}]")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder. [default: runs/demo or runs/MODEL]")
@click.option("--epochs", default=100, type=POSITIVE,
              help="Length of the run, unless --max-steps is given.")
@click.option("--max-steps", type=POSITIVE, help="Optimizer steps in the run (sets the schedule).")
@click.option("--stop-at", type=POSITIVE,
              help="End this job after this step with a checkpoint, schedule unchanged "
                   "(split a long run into jobs; continue with --resume).")
@click.option("--batch-size", type=POSITIVE,
              help=f"Clips per process and micro-batch. [default: {DEFAULTS['batch_size']}, "
                   f"DEMO {DEMO['batch_size']}]")
@click.option("--accum-steps", default=1, type=POSITIVE, help="Micro-batches per optimizer step.")
@click.option("--blr", type=click.FloatRange(0, min_open=True), help="Base learning rate: lr = blr * global batch / 256. "
              f"[default: {DEFAULTS['blr']}, DEMO {DEMO['blr']}]")
@click.option("--betas", default=(0.9, 0.95), type=(BETA, BETA), help="AdamW betas.")
@click.option("--weight-decay", default=0.05, type=click.FloatRange(0))
@click.option("--warmup", "warmup_epochs", type=click.FloatRange(0),
              help="Warm-up length in epochs. [default: 10, DEMO: 10% of the steps]")
@click.option("--warmup-steps", type=click.IntRange(0), help="Warm-up length in steps (instead of --warmup).")
@click.option("--device", default="auto", type=mae.DeviceChoice(),
              help="auto: cuda if available, else xla if torch_xla is installed, else cpu.")
@click.option("--precision", default="auto", type=click.Choice(["auto", "fp32", "bf16", "fp64"]),
              help="auto: bf16 autocast on cuda and xla, fp32 on cpu. fp64: weights and "
                   "arithmetic in float64, for exactness checks.")
@click.option("--workers", default=2, type=click.IntRange(0), help="DataLoader workers per process (and for preparing).")
@click.option("--seed", default=0, type=click.IntRange(0))
@click.option("--log-every", default=10, type=POSITIVE, help="Steps between metrics lines.")
@click.option("--save-every", type=POSITIVE, help="Steps between checkpoints. [default: 1000, DEMO 100]")
@click.option("--keep-checkpoints", is_flag=True,
              help="Also keep a copy of every checkpoint as checkpoint_stepNNNNNNN.pt "
                   "(e.g. for analyze.py over the course of pretraining).")
@click.option("--cache-dir", default="cache", type=click.Path(file_okay=False),
              help="Where feature stores of audio folders and the DEMO set are kept.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt if there is one.")
@click.option("--overwrite", is_flag=True,
              help="Start a new run in a non-empty --out, deleting its outputs of an earlier run.")
@click.option("--compile", "compiled", is_flag=True,
              help="Compile the model's forward and backward with torch.compile (cpu, cuda): "
                   "faster steps after a first one that compiles (minutes on a small CPU). "
                   "Checkpoints are the same; a run may switch with --resume.")
def main(data_paths, model_name, overrides, out, epochs, max_steps, stop_at, batch_size,
         accum_steps, blr, betas, weight_decay, warmup_epochs, warmup_steps, device,
         precision, workers, seed, log_every, save_every, keep_checkpoints, cache_dir, resume, overwrite,
         compiled):
    """Pretrain on the audio under DATA: folders (prepared once into a feature store under
    --cache-dir), a store from `python data.py prepare`, or tar shards from `python data.py
    shards` (their folder, or URLs / brace patterns; see shards.py). Without DATA: the built-in DEMO
    set of synthetic sounds with a small model, 300 steps (a few minutes on a laptop CPU).

    Several GPUs or nodes: torchrun --nproc_per_node N train.py ... (--batch-size is per
    process). Outputs in --out: checkpoint.pt, metrics.jsonl, recon_step*.png and, at the
    end, model.safetensors. Interrupt with Ctrl-C or SIGTERM: a checkpoint is written and
    the same command with --resume continues exactly."""
    options = dict(locals(), device=str(device))  # plain data in the checkpoint
    demo = not data_paths
    defaults = DEMO if demo else DEFAULTS
    overrides = model_overrides(overrides or defaults["overrides"])
    batch_size = batch_size if batch_size is not None else defaults["batch_size"]
    max_steps = max_steps if max_steps is not None else defaults["max_steps"]
    warmup_epochs = warmup_epochs if warmup_epochs is not None else defaults["warmup_epochs"]
    save_every = save_every if save_every is not None else defaults["save_every"]
    blr = blr if blr is not None else defaults["blr"]
    out = Path(out or ("runs/demo" if demo else f"runs/{model_name}"))
    try:
        cfg = mae.preset_config(model_name, **overrides)
    except (TypeError, ValueError) as error:
        raise click.BadParameter(str(error), param_hint="--set") from None

    device, rank, world = training.setup_device(device)
    mae.check_compile_device(compiled, device)
    master = rank == 0
    logging.basicConfig(level=logging.INFO if master else logging.ERROR, format="%(message)s")
    echo = click.echo if master else (lambda *args, **kwargs: None)
    with contextlib.ExitStack() as held:
        held.callback(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
        if master:  # --out stays locked until the run ends
            held.enter_context(claim_output(out, resume, overwrite))
        # ------------------------------------------------------------------ data
        if demo:
            echo("DEMO: no DATA given, so training on the built-in set of SYNTHETIC sounds "
                 "(tones, chirps, noise, clicks), not real audio.")
        torch.manual_seed(seed)
        checkpoint_path = out / CHECKPOINT
        checkpoint = None
        if resume and checkpoint_path.exists():
            checkpoint = read_run_checkpoint(checkpoint_path)
        elif resume:
            echo(f"--resume: no {checkpoint_path} yet, so starting a new run")
        shard_run = shards.is_shard_source(data_paths)
        if shard_run:
            loader = open_shards(data_paths, batch_size, accum_steps, workers, seed,
                                 cfg.input_size[0], pin_memory=device.type == "cuda")
            dataset = loader.dataset
        else:
            store = open_store(data_paths, Path(cache_dir), workers)
            dataset = data.CropDataset(store, crop_frames=cfg.input_size[0], seed=seed)
            check_enough_clips(len(dataset), world, batch_size, accum_steps)
            loader = data.make_loader(dataset, batch_size, workers=workers, seed=seed,
                                      pin_memory=device.type == "cuda")
        steps_per_epoch = len(loader) // accum_steps
        global_batch = batch_size * accum_steps * world
        total_steps = max_steps or epochs * steps_per_epoch
        if warmup_steps is None:
            warmup_steps = (round(warmup_epochs * steps_per_epoch) if warmup_epochs is not None
                            else total_steps // 10)
        if warmup_steps >= total_steps:
            raise click.ClickException(f"the warm-up ({warmup_steps} steps) is not shorter than "
                                       f"the run ({total_steps} steps): lower --warmup or "
                                       "--warmup-steps")
        peak_lr = blr * global_batch / 256
        # What makes the run: a resumed run must be given the same (workers, device,
        # precision, --save-every, --log-every, --stop-at may differ).
        settings = dict(batch_size=batch_size, accum_steps=accum_steps, blr=blr,
                        betas=list(betas), weight_decay=weight_decay, warmup_steps=warmup_steps,
                        total_steps=total_steps, seed=seed)
        layout = dict(clips=len(dataset), global_batch=global_batch,
                      steps_per_epoch=steps_per_epoch)
        if shard_run:  # the shard order depends on the readers (processes x workers)
            layout["shard_readers"] = world * dataset.workers

        # ------------------------------------------------------------------ model, optimizer
        if precision == "auto":
            precision = "fp32" if device.type == "cpu" else "bf16"
        dtype = torch.float64 if precision == "fp64" else torch.float32  # of weights and inputs
        model = mae.MAE(cfg).to(device, dtype)  # before loading: fp64 weights resume unrounded
        step = saved_step = 0
        if checkpoint:
            with restoring(checkpoint_path):
                changed = changed_settings(checkpoint, cfg, settings, layout)
                if changed:
                    raise click.ClickException(
                        f"cannot resume {files.shown(checkpoint_path)} with other settings: "
                        f"{'; '.join(changed)}. Give the stored values, or start a new run "
                        "with another --out or --overwrite")
                if "settings" not in checkpoint:
                    echo(f"warning: {checkpoint_path} is from an older version that did not "
                         "store its run's settings: they are not checked")
                model.load_state_dict(checkpoint["model"])
                step = saved_step = int(checkpoint["step"])
                training.set_rng_states(checkpoint["rng"])
            echo(f"resuming {checkpoint_path} at step {step}")
        optimizer = training.adamw(model.param_groups(weight_decay), peak_lr, betas, device)
        if checkpoint:
            with restoring(checkpoint_path):
                optimizer.load_state_dict(checkpoint["optimizer"])  # moves its state to the device
        # `model` stays the eager module: the figures and checkpoints use it (plain state_dict keys).
        # Static shapes (the mask ratio fixes the visible token count): one compilation per run.
        train_model = torch.compile(model, dynamic=False) if compiled else model
        if world > 1:  # torch's recommended order: compile the inner module, then wrap it in DDP
            train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                              gradient_as_bucket_view=device.type == "xla")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        # ------------------------------------------------------------------ outputs
        if master:
            training.keep_metrics_until(out / METRICS, step)
        dataset.set_epoch(0)
        first_crop, first_clip = dataset.example()  # shown in every figure
        example = first_crop[None].to(device, dtype)
        example_noise = mask_noise(torch.tensor([first_clip]), seed, 0, cfg.num_patches).to(device)
        echo(f"{model_name}: "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters on {device} "
             f"x {world}, {precision}{', compiled' if compiled else ''}; {len(dataset)} clips, "
             f"{steps_per_epoch} steps per epoch, global batch {global_batch}, peak lr "
             f"{peak_lr:.3g}, {warmup_steps} warm-up steps, {total_steps} steps")

        def save(reason: str) -> None:
            checkpoint = dict(
                config=cfg.to_dict(), model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=dict(peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps),
                step=step, rng=training.rng_states(), options=options, settings=settings,
                data=dict(epoch=step // steps_per_epoch,
                          micro_batch=step % steps_per_epoch * accum_steps, seed=seed, **layout))
            training.save_checkpoint(checkpoint_path, checkpoint)
            if keep_checkpoints:  # a copy per save, e.g. for analyze.py over pretraining
                kept = out / f"checkpoint_step{step:07d}.pt"
                files.atomic_write(kept, lambda tmp: shutil.copyfile(checkpoint_path, tmp))
            save_reconstruction(model, example, example_noise, out / f"recon_step{step:07d}.png",
                                f"{out.name}, step {step} ({reason})")

        # ------------------------------------------------------------------ training loop
        batches = micro_batches(loader, seed, step // steps_per_epoch,
                                step % steps_per_epoch * accum_steps,
                                steps_per_epoch * accum_steps, cfg.num_patches)
        end = min(total_steps, stop_at or total_steps)
        progress = tqdm(total=total_steps, initial=step, unit="step", disable=not master,
                        dynamic_ncols=True)
        loss_sum, logged_steps, log_time = torch.zeros((), device=device), 0, time.perf_counter()
        with training.stop_requests() as signals, open(os.devnull if not master else
                                              out / METRICS, "a") as metrics:
            while step < end:
                lr = training.learning_rate(step, peak_lr, warmup_steps, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(accum_steps):
                    crops, noise = next(batches)
                    crops, noise = crops.to(device, dtype, non_blocking=True), noise.to(device)
                    last = micro == accum_steps - 1
                    with contextlib.nullcontext() if last or world == 1 else train_model.no_sync():
                        with autocast:
                            loss = train_model(crops, noise)[0] / accum_steps
                        loss.backward()
                    loss_sum += loss.detach()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "xla":
                    import torch_xla
                    torch_xla.sync()  # run the step's graph
                step += 1
                logged_steps += 1
                progress.update()

                stop = training.any_process(bool(signals), device)
                checkpoint_due = step % save_every == 0 or step == end or stop
                if step % log_every == 0 or checkpoint_due:
                    mean_loss = training.mean_over_processes(loss_sum) / logged_steps
                    if not math.isfinite(mean_loss):
                        kept = (f"the last good checkpoint (step {saved_step}) stays in "
                                f"{checkpoint_path}" if saved_step else "no checkpoint was written")
                        raise click.ClickException(f"the loss is {mean_loss} at step {step}: "
                                                   f"stopping; {kept}. Lower --blr or check the "
                                                   "data.")
                    seconds = time.perf_counter() - log_time
                    record = dict(step=step, epoch=round(step / steps_per_epoch, 4),
                                  loss=mean_loss, lr=lr,
                                  samples_per_s=logged_steps * global_batch / seconds,
                                  time=time.time())
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                                         samples_s=f"{record['samples_per_s']:.1f}")
                    loss_sum.zero_()
                    logged_steps, log_time = 0, time.perf_counter()
                if checkpoint_due:
                    if master:
                        save("interrupted" if stop else "end" if step == end else "checkpoint")
                    saved_step = step
                if stop:
                    if dist.is_initialized():
                        dist.barrier()  # no process exits before the checkpoint is written
                    progress.close()
                    batches.close()  # ends the DataLoader workers now
                    signum = signals[0] if signals else signal.SIGTERM
                    echo(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint "
                         f"{checkpoint_path}: continue with the same command and --resume")
                    raise SystemExit(128 + signum)
        progress.close()

        if master and step == total_steps:
            checkpoints.save_pretrained(model, out / FINAL)
            echo(f"done: {step} steps. Final weights {out / FINAL} "
                 f"(checkpoints.load_pretrained, embed.py), checkpoint {checkpoint_path}, metrics "
                 f"{out / METRICS}, reconstructions {out}/recon_step*.png")
        elif master:
            echo(f"stopped at step {step} of {total_steps} (--stop-at); checkpoint "
                 f"{checkpoint_path}: continue with --resume")


if __name__ == "__main__":
    main()
