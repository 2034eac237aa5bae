"""Reproduce the papers' central claim at small scale: MW-MAE vs MAE (and AudioMAE++).

Two commands:

`python experiment.py pool --out POOL_DIR`
    Builds a pretraining pool of real recorded audio that any Debian machine can rebuild from
    its package archive (no other internet access): the .debs of POOL_PACKAGES are fetched
    with `apt-get download`, unpacked with `dpkg-deb -x` (nothing is installed), their audio
    files are collected and turned into a log-mel feature store with data.prepare. The pool
    holds nothing from the evaluation tasks. POOL_DIR/pool.json and POOL_DIR/pool.md list the
    hours of audio and the licences (from each package's debian/copyright) per package.

`python experiment.py run --pool POOL_DIR/store --tasks /path/to/tasks --out experiments/NAME`
    Pretrains MAE, MW-MAE and AudioMAE++ (same encoder, same decoder width and depth, same
    data, steps, batch and seed) with train.py, probes the pretrained models and their random
    initialisations on every HEAR task with evaluate.py, and writes the s(m) table
    (results.md, score.md) and the pretraining loss curves (loss_curves.png). `--fraction 0.1`
    pretrains on a deterministic 10% of the pool's files instead (the papers' low-data
    experiment); `--set KEY=VALUE` changes all three models alike (e.g. a shallower encoder);
    `--max-clips-per-split N` evaluates on deterministic reduced copies of the tasks. Finished
    steps found in --work (checkpoints, results.json) are reused, so an interrupted run
    continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
from matplotlib.figure import Figure

import audio
import checkpoints
import data
import mae

logger = logging.getLogger("experiment")
HERE = Path(__file__).resolve().parent  # train.py and evaluate.py live here

# Debian packages (bookworm, section main) that ship recorded sound.
POOL_PACKAGES = {
    "asterisk-core-sounds-en-wav": "telephone prompts, US English speech",
    "asterisk-core-sounds-fr-wav": "telephone prompts, Canadian French speech",
    "asterisk-core-sounds-es-wav": "telephone prompts, Mexican Spanish speech",
    "asterisk-core-sounds-it-wav": "telephone prompts, Italian speech",
    "asterisk-core-sounds-ru-wav": "telephone prompts, Russian speech",
    "klettres-data": "spoken letters and syllables (KLettres), several languages",
    "ktuberling-data": "spoken words and sound effects (KTuberling), several languages",
    "hydrogen-drumkits": "drum-kit samples (Hydrogen)",
    "sonic-pi-samples": "instrument, drum and ambient samples (Sonic Pi)",
    "wesnoth-1.16-music": "orchestral game music (Battle for Wesnoth)",
}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".aiff", ".aif"}


# ----------------------------------------------------------------------------- pool

def check_call(command: list[str], cwd: Path | None = None) -> None:
    """Run a command, raising with its stderr when it fails."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} failed:\n{done.stderr.strip()}")


def download_deb(package: str, deb_dir: Path) -> Path:
    """The package's .deb in `deb_dir`, fetched with `apt-get download` unless already there."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(deb_dir.glob(f"{package}_*.deb"))
    if not found:
        check_call(["apt-get", "download", package], cwd=deb_dir)
        found = sorted(deb_dir.glob(f"{package}_*.deb"))
    if not found:
        raise click.ClickException(f"apt-get download {package} left no .deb in {deb_dir}")
    return found[-1]


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack the .deb's files into `dest` (dpkg-deb -x; nothing is installed)."""
    if not (dest / ".extracted").exists():
        dest.mkdir(parents=True, exist_ok=True)
        check_call(["dpkg-deb", "-x", str(deb), str(dest)])
        (dest / ".extracted").write_text(deb.name + "\n")
    return dest


def audio_files(root: Path) -> list[Path]:
    """Files under `root` whose suffix is an audio format libsndfile reads, sorted."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def licences(copyright_file: Path) -> list[str]:
    """Licence names stated in a debian/copyright file.

    Machine-readable files (DEP-5): every `License:` name. Free-form files: the licences
    whose text they point to in /usr/share/common-licenses. The union covers all files of the
    package, not only its audio.
    """
    if not copyright_file.exists():
        return ["(no copyright file)"]
    text = copyright_file.read_text(errors="replace")
    names = re.findall(r"^License:[ \t]*(\S[^\n]*)$", text, flags=re.MULTILINE)
    if not names:
        names = re.findall(r"/usr/share/common-licenses/([\w.+-]+)", text)
    return sorted({name.strip().rstrip(".") for name in names}) or ["(not stated)"]


@dataclass
class PackageAudio:
    """One package's contribution to the pool."""

    package: str
    version: str
    description: str
    files: int
    bad_files: int
    hours: float
    licences: list[str]


def package_of(path: str, extract_dir: Path) -> str:
    """The package a store path was unpacked from (its first folder under `extract_dir`)."""
    return Path(path).relative_to(extract_dir.resolve()).parts[0]


def summarise_pool(store_dir: Path, extract_dir: Path, debs: dict[str, Path]) -> list[PackageAudio]:
    """Files, bad files, hours and licences per package, from the store's index."""
    frames = {package: 0 for package in debs}
    files = dict.fromkeys(debs, 0)
    for entry in data.read_index(store_dir):
        package = package_of(entry["path"], extract_dir)
        frames[package] += entry["frames"]
        files[package] += 1
    bad = dict.fromkeys(debs, 0)
    for path in data.read_bad_files(store_dir):
        bad[package_of(path, extract_dir)] += 1
    return [PackageAudio(package, deb.name.split("_")[1].replace("%3a", ":"),
                         POOL_PACKAGES.get(package, ""), files[package], bad[package],
                         frames[package] * audio.HOP / audio.SAMPLE_RATE / 3600,
                         licences(extract_dir / package / "usr/share/doc" / package / "copyright"))
            for package, deb in debs.items()]


def pool_markdown(rows: list[PackageAudio]) -> str:
    """The pool table: package, version, content, clips, bad files, hours, licences."""
    lines = ["| package | version | content | clips | bad files | hours | licences (debian/copyright) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.package} | {r.version} | {r.description} | {r.files} | {r.bad_files} "
                     f"| {r.hours:.2f} | {', '.join(r.licences)} |")
    lines.append(f"| **total** | | | {sum(r.files for r in rows)} | {sum(r.bad_files for r in rows)} "
                 f"| {sum(r.hours for r in rows):.2f} | |")
    return "\n".join(lines) + "\n"


def build_pool(out: Path, packages: list[str], workers: int = 1) -> list[PackageAudio]:
    """Download, unpack and prepare `packages` into the feature store `out/store`."""
    debs = {package: download_deb(package, out / "debs") for package in packages}
    files: list[Path] = []
    for package, deb in debs.items():
        found = audio_files(extract_deb(deb, out / "extract" / package))
        logger.info("%s: %d audio files", package, len(found))
        files += found
    summary = data.prepare(files, out / "store", workers=workers)
    logger.info("pool store: %s", summary)
    rows = summarise_pool(out / "store", out / "extract", debs)
    (out / "pool.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    (out / "pool.md").write_text(pool_markdown(rows))
    return rows


# ----------------------------------------------------------------------------- data for the run

def subset_store(store_dir: Path, fraction: float, out: Path) -> Path:
    """A store of a deterministic `fraction` of the pool's files (the store itself at 1.0).

    Files are ranked by the SHA-1 of their path relative to the pool's common folder, so the
    choice depends only on the file names, and the first ceil(fraction * n) are prepared
    again (data.prepare) into `out`."""
    if fraction >= 1.0:
        return store_dir
    if not 0.0 < fraction < 1.0:
        raise click.BadParameter(f"fraction {fraction} is not in (0, 1]")
    paths = [entry["path"] for entry in data.read_index(store_dir)]
    if not paths:
        raise click.ClickException(f"{store_dir} holds no clips")
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else Path(paths[0]).parent
    ranked = sorted(paths, key=lambda p: hashlib.sha1(str(Path(p).relative_to(common)).encode()).hexdigest())
    chosen = ranked[: math.ceil(fraction * len(paths))]
    data.prepare(chosen, out, progress=False)
    return out


def subset_tasks(task_root: Path, out: Path, max_per_split: int | None) -> list[Path]:
    """The HEAR task folders under `task_root`; with `max_per_split`, reduced copies in `out`
    keeping at most that many files of each split (the first by SHA-1 of the file name; the
    audio is symlinked, not copied)."""
    tasks = sorted(p.parent for p in task_root.glob("*/task_metadata.json"))
    if not tasks:
        raise click.ClickException(f"no HEAR task folders (*/task_metadata.json) in {task_root}")
    if not max_per_split:
        return tasks
    return [subset_task(task, out / task.name, max_per_split) for task in tasks]


def subset_task(task: Path, out: Path, max_per_split: int) -> Path:
    """A copy of one task folder with at most `max_per_split` files per split."""
    metadata = json.loads((task / "task_metadata.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for name in ("task_metadata.json", "labelvocabulary.csv"):
        (out / name).write_text((task / name).read_text())
    rate = str(metadata.get("sample_rate", audio.SAMPLE_RATE))
    for split in metadata["splits"]:
        labels = json.loads((task / f"{split}.json").read_text())
        kept = sorted(labels, key=lambda f: hashlib.sha1(f.encode()).hexdigest())[:max_per_split]
        (out / f"{split}.json").write_text(json.dumps({f: labels[f] for f in sorted(kept)}, indent=1))
        audio_dir = out / rate / split
        audio_dir.mkdir(parents=True, exist_ok=True)
        for file in kept:
            link = audio_dir / file
            if not link.is_symlink():
                link.symlink_to((task / rate / split / file).resolve())
    return out


# ----------------------------------------------------------------------------- steps of the run

MODELS = ("mae-tiny", "mwmae-tiny", "audiomaepp-tiny")


def checked_overrides(items: tuple[str, ...]) -> dict:
    """--set FIELD=VALUE items (the syntax of train.py --set), checked on a preset."""
    try:
        overrides = mae.parse_overrides(items)
        mae.preset_config(MODELS[0], **overrides)  # bad values fail here
    except (TypeError, ValueError) as error:
        raise click.BadParameter(str(error)) from error
    return overrides


def python(script: str, *args: str, log: Path) -> float:
    """Run `python script args` from this folder, output appended to `log`; wall seconds."""
    command = [sys.executable, str(HERE / script), *map(str, args)]
    logger.info("$ %s", " ".join(command[1:]))
    start = time.perf_counter()
    with open(log, "a") as stream:
        stream.write(f"$ {' '.join(command[1:])}\n")
        stream.flush()
        done = subprocess.run(command, cwd=HERE, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise click.ClickException(f"{script} failed (exit {done.returncode}): see {log}")
    return time.perf_counter() - start


@dataclass
class Settings:
    """Everything that is the same for the three models."""

    steps: int
    batch_size: int
    seed: int
    overrides: dict
    blr: float
    warmup_steps: int
    seeds: int
    probe_epochs: int
    threads: int


def pretrain(model: str, store: Path, out: Path, s: Settings, log: Path) -> float | None:
    """train.py for one model (skipped when out/model.safetensors exists; an interrupted
    run is resumed from its checkpoint); wall seconds."""
    if (out / "model.safetensors").exists():
        logger.info("%s: already pretrained in %s", model, out)
        return None
    sets = [arg for key, value in s.overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    return python("train.py", store, "--model", model, *sets, "--out", out, "--max-steps", s.steps,
                  "--batch-size", s.batch_size, "--seed", s.seed, "--blr", s.blr,
                  "--warmup-steps", s.warmup_steps, "--workers", 0, "--log-every", 1,
                  "--save-every", s.steps, "--device", "cpu", "--resume", log=log)


def random_init(model: str, out: Path, s: Settings) -> Path:
    """The model's random initialisation (seed s.seed) saved as out/model.safetensors."""
    path = out / "model.safetensors"
    if not path.exists():
        torch.manual_seed(s.seed)
        checkpoints.save_pretrained(mae.build(model, **s.overrides), path)
    return path


def evaluate(model_file: Path, tasks: list[Path], out: Path, s: Settings, log: Path) -> float | None:
    """evaluate.py on all tasks (skipped when out/results.json is complete); wall seconds."""
    results = out / "results.json"
    if results.exists() and len(json.loads(results.read_text())["tasks"]) == len(tasks):
        logger.info("%s: already evaluated", out)
        return None
    return python("evaluate.py", "run", model_file, *tasks, "--out", out, "--seeds", s.seeds,
                  "--threads", s.threads, "--max-epochs", s.probe_epochs, "--device", "cpu", log=log)


# ----------------------------------------------------------------------------- reports

def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_losses(runs: dict[str, Path], png: Path, title: str) -> None:
    """Pretraining loss (masked-patch MSE) against step for each run, one figure."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for label, run_dir in runs.items():
        metrics = read_metrics(run_dir)
        axes.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label=label)
    axes.set(xlabel="optimizer step", ylabel="training loss (MSE on masked patches)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=120)


def task_table(eval_dirs: dict[str, Path]) -> str:
    """Mean ± 95% CI of the primary score per task and model, from results.json files."""
    results = {label: json.loads((d / "results.json").read_text()) for label, d in eval_dirs.items()}
    tasks = sorted(set.intersection(*(set(r["tasks"]) for r in results.values())))
    lines = ["| model | " + " | ".join(tasks) + " | embedding + probe time (s) |",
             "|---" * (len(tasks) + 2) + "|"]
    for label, result in results.items():
        seconds = sum(result["tasks"][t]["embedding_s"] + result["tasks"][t]["probe_s"] for t in tasks)
        cells = []
        for task in tasks:
            entry = result["tasks"][task]
            score = entry["scores"][entry["primary"]]
            cells.append(f"{100 * score['mean']:.1f} ± {100 * score['ci95']:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def training_table(runs: dict[str, Path]) -> str:
    """Steps, first and last logged loss, throughput and time of each pretraining (from
    metrics.jsonl: the time from the first to the last logged step, start-up not counted)."""
    lines = ["| run | steps | first loss | last loss (mean of last 10 steps) | samples/s | "
             "time, step 1 to last (s) |", "|---|---|---|---|---|---|"]
    for label, run_dir in runs.items():
        metrics = read_metrics(run_dir)
        if not metrics:
            continue
        tail = [m["loss"] for m in metrics[-10:]]
        rate = sum(m["samples_per_s"] for m in metrics) / len(metrics)
        lines.append(f"| {label} | {metrics[-1]['step']} | {metrics[0]['loss']:.4f} | "
                     f"{sum(tail) / len(tail):.4f} | {rate:.1f} | {metrics[-1]['time'] - metrics[0]['time']:.0f} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, tag: str, context: dict, score_md: str, tasks_md: str, train_md: str,
                 png: Path, s: Settings, seconds: dict) -> None:
    """results.md (tables) and run.json (settings and timings) in `out`."""
    (out / "run.json").write_text(json.dumps(
        dict(context=context, settings=asdict(s), seconds=seconds), indent=1) + "\n")
    (out / "results.md").write_text(report_markdown(
        f"MW-MAE vs MAE vs AudioMAE++ at small scale ({tag})", context, score_md, tasks_md,
        train_md, png))


def report_markdown(title: str, context: dict, score_md: str, tasks_md: str, train_md: str,
                     png: Path) -> str:
    """The experiment's results.md: its settings, the s(m) table of all models, the per-task
    table and the pretraining table (evaluate.results_markdown is one model's results)."""
    settings = "\n".join(f"- {key}: {value}" for key, value in context.items())
    return (f"# {title}\n\n{settings}\n\n## Overall score s(m) (primary score per task, %, mean over "
            f"probe seeds; s(m) normalised over the models in this table)\n\n{score_md}\n"
            f"## Per task: mean ± 95% CI over probe seeds (%)\n\n{tasks_md}\n"
            f"## Pretraining\n\n{train_md}\nLoss curves: `{png.name}`\n")


# ----------------------------------------------------------------------------- command line

@click.group()
def main() -> None:
    """Small-scale reproduction: build the audio pool, run the experiment."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@main.command("pool")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Pool folder: debs/, extract/, store/, pool.json, pool.md.")
@click.option("--package", "packages", multiple=True, default=tuple(POOL_PACKAGES),
              show_default=True, help="Debian package to include (repeat).")
@click.option("--workers", default=1, show_default=True, help="Processes computing log-mels.")
def pool_command(out: Path, packages: tuple[str, ...], workers: int) -> None:
    """Fetch the sound packages, unpack them and build the feature store OUT/store."""
    rows = build_pool(out, list(packages), workers)
    click.echo(pool_markdown(rows))
    click.echo(f"pool: store {out / 'store'}, {sum(r.hours for r in rows):.2f} h of audio")


@main.command("run")
@click.option("--pool", "pool_store", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Feature store of the pretraining pool (POOL_DIR/store).")
@click.option("--tasks", "task_root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of HEAR task folders; every task in it is evaluated.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where results.md, score.md, run.json and loss_curves.png go.")
@click.option("--work", default=Path("runs/small_scale"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints, evaluation caches and task subsets (finished steps are reused).")
@click.option("--steps", default=300, show_default=True, help="Optimizer steps of every pretraining.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--blr", default=1.5e-4, show_default=True, help="Base lr (lr = blr * batch / 256).")
@click.option("--warmup-steps", type=int, help="[default: steps // 10]")
@click.option("--seed", default=0, show_default=True, help="Seed of the init, crops and masks (all models).")
@click.option("--seeds", default=3, show_default=True, help="Probe seeds per task.")
@click.option("--fraction", default=1.0, show_default=True, help="Share of the pool's files to pretrain on.")
@click.option("--set", "override_items", multiple=True, metavar="KEY=VALUE",
              help="Model config override for all three models, e.g. --set depth=4.")
@click.option("--max-clips-per-split", type=int, help="Evaluate on reduced task copies. [default: all]")
@click.option("--probe-epochs", default=500, show_default=True, help="Probe epoch limit.")
@click.option("--random/--no-random", "with_random", default=True, show_default=True,
              help="Also evaluate the random initialisation of each model.")
@click.option("--threads", default=1, show_default=True,
              help="torch threads of evaluate.py (its small probe steps ran 7x slower with 2 threads "
                   "than with 1 on a busy 2-core machine).")
def run_command(pool_store, task_root, out, work, steps, batch_size, blr, warmup_steps, seed, seeds,
                fraction, override_items, max_clips_per_split, probe_epochs, with_random, threads):
    """Pretrain MAE, MW-MAE and AudioMAE++ alike, probe them on every task, write the table."""
    start = time.perf_counter()
    s = Settings(steps, batch_size, seed, checked_overrides(override_items), blr,
                 warmup_steps if warmup_steps is not None else steps // 10, seeds, probe_epochs, threads)
    tag = "full" if fraction >= 1.0 else f"frac{fraction:g}"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = work / f"run_{tag}.log"
    store = subset_store(pool_store, fraction, work / f"pool_{tag}")
    pool = data.FeatureStore(store)
    tasks = subset_tasks(task_root, work / f"tasks_max{max_clips_per_split}", max_clips_per_split)
    runs = {f"{m}_{tag}": work / "pretrain" / f"{m}_{tag}" for m in MODELS}
    seconds: dict[str, float | None] = {}
    for model, (label, run_dir) in zip(MODELS, runs.items()):
        seconds[label] = pretrain(model, store, run_dir, s, log)
    png = out / "loss_curves.png"
    plot_losses(runs, png, f"pretraining on {100 * fraction:g}% of the pool, batch {batch_size}")
    candidates = {label: run_dir / "model.safetensors" for label, run_dir in runs.items()}

    def context() -> dict:
        return {
            "pool": f"{pool_store} ({100 * fraction:g}% of its files: {len(pool)} clips, "
                    f"{pool.frames.sum() * audio.HOP / audio.SAMPLE_RATE / 3600:.2f} h)",
            "models": f"{', '.join(MODELS)} with overrides {s.overrides or 'none'}",
            "pretraining": f"{steps} steps, batch {batch_size}, blr {blr} (lr {blr * batch_size / 256:.3g}), "
                           f"{s.warmup_steps} warm-up steps, seed {seed}, fp32 CPU",
            "evaluation": f"{len(tasks)} tasks from {task_root}"
                          f"{f' (at most {max_clips_per_split} clips per split)' if max_clips_per_split else ''}, "
                          f"{seeds} probe seeds, probe epoch limit {probe_epochs}",
            "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch "
                       f"{torch.__version__}",
            "wall time of this command": f"{time.perf_counter() - start:.0f} s (steps found done "
                                         "in --work are reused and not counted)",
        }

    if with_random:
        candidates |= {f"{m}_random": random_init(m, work / "random" / m, s) for m in MODELS}
    eval_dirs = {}
    for label, model_file in candidates.items():
        seconds[f"eval {label}"] = evaluate(model_file, tasks, work / "eval" / label, s, log)
        eval_dirs[label] = work / "eval" / label
        write_report(out, tag, context(), "(s(m) is computed when every model is evaluated)\n",
                     task_table(eval_dirs), training_table(runs), png, s, seconds)
    python("evaluate.py", "score", *eval_dirs.values(), "--out", out / "score.md", log=log)
    write_report(out, tag, context(), (out / "score.md").read_text(), task_table(eval_dirs),
                 training_table(runs), png, s, seconds)
    click.echo((out / "results.md").read_text())


if __name__ == "__main__":
    main()
