"""shards.py and its commands: tar shards of a store, shard URLs as train.py's DATA, the pure
assignment of shards to (rank, worker), exact resume, unreadable shards, webdataset missing.

A 16-clip store written as 8 shards of 2 clips; runs of a 1-layer model on one CPU thread.
"""
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import click
import click.testing
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

import checkpoints
import data
import shards
import train

TINY = ["--set", "depth=1", "--set", "decoder_depth=1", "--set", "decoder_dim=64",
        "--warmup-steps", "2", "--log-every", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> data.FeatureStore:
    """16 synthetic clips of 2.5 s (251 frames)."""
    return data.prepare_demo(tmp_path_factory.mktemp("store"), n_clips=16, seconds=2.5)


@pytest.fixture(scope="module")
def shard_dir(store, tmp_path_factory) -> Path:
    """The store as 8 shards of 2 clips."""
    out = tmp_path_factory.mktemp("shards")
    shards.write_shards(store, out, shard_bytes=2 * 251 * data.FRAME_BYTES, progress=False)
    return out


def pipe_pattern(folder: Path) -> str:
    return f"pipe:cat {folder}/{{000000..000007}}.tar"


def epoch_clips(loader: shards.ShardLoader, epoch: int, start: int = 0) -> list[list[int]]:
    return [clips.tolist() for _, clips in loader.epoch_batches(epoch, start, len(loader))]


def run_train(*args) -> None:
    train.main.main([str(arg) for arg in args], standalone_mode=False)


# ----------------------------------------------------------------------------- writing

def test_shards_command_writes_every_clip_and_an_index(store, tmp_path):
    out = tmp_path / "shards"
    data.main.main(["shards", str(store.root), "--out", str(out), "--shard-mb", "0.08"],
                   standalone_mode=False)
    index = json.loads((out / shards.INDEX_NAME).read_text())
    assert [entry["name"] for entry in index["shards"]] == [f"{n:06d}.tar" for n in range(8)]
    assert [entry["clips"] for entry in index["shards"]] == [2] * 8
    assert index["clips"] == 16 and index["frames"] == int(store.frames.sum())
    assert index["hours"] == pytest.approx(16 * 251 * 0.01 / 3600)
    paths = [entry["path"] for entry in data.read_index(store.root)]
    with tarfile.open(out / "000003.tar") as tar:
        names = tar.getnames()
        assert names == ["000000006.mel.npy", "000000006.json", "000000007.mel.npy", "000000007.json"]
        meta = json.loads(tar.extractfile("000000007.json").read())
        log_mel = np.load(io.BytesIO(tar.extractfile("000000007.mel.npy").read()))
    assert meta == dict(clip=7, path=paths[7], frames=251, mean=float(store.means[7]),
                        std=float(store.stds[7]))
    assert log_mel.dtype == np.float16 and np.array_equal(log_mel, store.log_mel(7))

    with pytest.raises(click.ClickException, match="not empty.*--overwrite"):
        data.main.main(["shards", str(store.root), "--out", str(out)], standalone_mode=False)
    data.main.main(["shards", str(store.root), "--out", str(out), "--overwrite"],
                   standalone_mode=False)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == ["000000.tar"]


def test_shard_crops_are_the_store_crops(store, shard_dir):
    dataset = data.CropDataset(store, seed=3)
    loader = shards.make_shard_loader(shards.open_shard_set([str(shard_dir)]), 2, seed=3)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        batches = list(loader.epoch_batches(epoch, 0, len(loader)))
        assert sorted(clip for _, clips in batches for clip in clips.tolist()) == list(range(16))
        for crops, clips in batches:
            for crop, clip in zip(crops, clips):
                assert torch.equal(crop, dataset[int(clip)][0])


# ----------------------------------------------------------------------------- epoch plan

@pytest.mark.parametrize("world, workers", [(1, 1), (2, 2), (3, 2), (2, 3)])
def test_assignment_is_a_pure_partition_into_whole_rounds(world, workers):
    readers = world * workers
    plans = [shards.assign_shards(20, seed=1, epoch=epoch, world=world, workers=workers)
             for epoch in range(6)]
    assert plans[0] == shards.assign_shards(20, seed=1, epoch=0, world=world, workers=workers)
    assert plans[0] != shards.assign_shards(20, seed=2, epoch=0, world=world, workers=workers)
    for plan in plans:
        lists = [shard_list for rank in plan for shard_list in rank]
        assert len(lists) == readers and all(len(x) == 20 // readers for x in lists)
        dealt = [shard for x in lists for shard in x]
        assert len(set(dealt)) == len(dealt) == 20 // readers * readers
    assert len({str(plan) for plan in plans}) == 6
    assert set().union(*({s for rank in plan for x in rank for s in x} for plan in plans)) == set(range(20))
    with pytest.raises(ValueError, match="every reader needs a shard"):
        shards.assign_shards(readers - 1, 0, 0, world, workers)


def test_batches_per_reader_holds_for_the_smallest_shards():
    # 5 shards, 2 readers: 2 shards each; the worst pair (3 + 4 clips) gives 3 batches of 2
    assert shards.batches_per_reader([10, 3, 4, 10, 9], readers=2, batch_size=2) == 3
    assert shards.batches_per_reader([2] * 8, readers=4, batch_size=2) == 2


def test_pipe_urls_read_as_the_folder_with_the_index_beside_them(shard_dir):
    assert shards.index_url("pipe:aws s3 cp s3://b/s/000007.tar -") == "pipe:aws s3 cp s3://b/s/shards.json -"
    folder = shards.open_shard_set([str(shard_dir)])
    piped = shards.open_shard_set([pipe_pattern(shard_dir)])
    assert piped.urls[7] == f"pipe:cat {shard_dir}/000007.tar"
    assert (piped.clips, piped.first_clips) == (folder.clips, folder.first_clips)
    by_folder = shards.make_shard_loader(folder, 2, workers=2, seed=4)
    by_pipe = shards.make_shard_loader(piped, 2, workers=2, seed=4)
    assert epoch_clips(by_pipe, 2) == epoch_clips(by_folder, 2)
    local = shards.open_shard_set([f"{shard_dir}/{{000000..000003}}.tar"])
    assert local.first_clips == [0, 2, 4, 6]
    with pytest.raises(OSError, match="shards.json"):
        shards.open_shard_set([f"pipe:cat {shard_dir}/nowhere/000000.tar"])


@pytest.mark.parametrize("workers", [0, 3])
def test_starting_mid_epoch_gives_the_rest_of_the_straight_epoch(shard_dir, workers):
    """What --resume relies on: batches [start, end) of an epoch are those of a full pass.
    3 workers: 6 batches, each worker skips start // 3 itself, the rest is dropped."""
    loader = shards.make_shard_loader(shards.open_shard_set([str(shard_dir)]), 2,
                                      workers=workers, seed=1)
    straight = epoch_clips(loader, 1)
    assert len(straight) == len(loader) == (8 if workers == 0 else 6)
    for start in (1, 4, len(loader) - 1):
        assert epoch_clips(loader, 1, start) == straight[start:]


def record_epochs(rank: int, shard_dir: str, out: str) -> None:
    """One of two gloo processes: the clip indices of two epochs, 2 workers."""
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                            world_size=2)
    try:
        loader = shards.make_shard_loader(shards.open_shard_set([shard_dir]), 2, workers=2)
        seen = {epoch: epoch_clips(loader, epoch) for epoch in (0, 1)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_with_two_workers_see_every_clip_once(shard_dir, tmp_path):
    """A real 2-process gloo group (forked: seconds instead of a minute of re-imports), each
    with 2 DataLoader workers: every clip once per epoch, each process its pure plan's shards."""
    torch.multiprocessing.start_processes(record_epochs, args=(str(shard_dir), str(tmp_path)),
                                          nprocs=2, start_method="fork")
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for epoch in ("0", "1"):
        clips = [clip for rank in seen for batch in rank[epoch] for clip in batch]
        assert sorted(clips) == list(range(16))
    assert seen[0]["0"] != seen[0]["1"]
    for rank in range(2):  # what each process read is what the pure plan gives it
        plan = shards.assign_shards(8, 0, 0, world=2, workers=2)[rank]
        assert {clip for batch in seen[rank]["0"] for clip in batch} == {
            2 * shard + i for worker in plan for shard in worker for i in (0, 1)}


# ----------------------------------------------------------------------------- train.py

def test_resume_mid_epoch_equals_the_straight_run(shard_dir, tmp_path):
    """10 steps (8 per epoch, 2 workers) straight from the folder = 3 steps, stop, resume
    from pipe:cat URLs for 7 more (mid-epoch: one worker's batch is read and dropped)."""
    common = [*TINY, "--workers", 2, "--batch-size", 2, "--max-steps", 10]
    run_train(shard_dir, *common, "--out", tmp_path / "straight")
    run_train(pipe_pattern(shard_dir), *common, "--out", tmp_path / "split", "--stop-at", 3)
    checkpoint = torch.load(tmp_path / "split/checkpoint.pt", weights_only=True)
    assert checkpoint["data"]["micro_batch"] == 3 and checkpoint["data"]["shard_readers"] == 2
    with pytest.raises(click.ClickException, match=r"shard_readers 3 \(stored 2\)"):
        run_train(pipe_pattern(shard_dir), *TINY, "--workers", 3, "--batch-size", 2,
                  "--max-steps", 10, "--out", tmp_path / "split", "--resume")
    run_train(pipe_pattern(shard_dir), *common, "--out", tmp_path / "split", "--resume")

    straight = checkpoints.load_pretrained(tmp_path / "straight/model.safetensors").state_dict()
    split = checkpoints.load_pretrained(tmp_path / "split/model.safetensors").state_dict()
    assert all(torch.equal(straight[key], split[key]) for key in straight)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
              for name in ("straight", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 10


def test_unreadable_and_truncated_shards_are_skipped_reported_and_counted(shard_dir, tmp_path,
                                                                          caplog):
    """Shard 1 cut after its first clip, shard 5 cut inside a member, shard 2 not a tar."""
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    with tarfile.open(shard_dir / "000001.tar") as tar:
        second_clip = tar.getmembers()[2].offset
    (broken / "000001.tar").write_bytes((shard_dir / "000001.tar").read_bytes()[:second_clip])
    (broken / "000005.tar").write_bytes((shard_dir / "000005.tar").read_bytes()[:50000])
    (broken / "000002.tar").write_bytes(b"not a tar file" * 100)
    shard_set = shards.open_shard_set([str(broken)])
    loader = shards.make_shard_loader(shard_set, 2, workers=0)
    batches = epoch_clips(loader, 0)
    assert len(batches) == len(loader) == 8  # the clips of good shards fill the epoch
    clips = [clip for batch in batches for clip in batch]
    assert set(clips) == set(range(16)) - {2, 3, 4, 5, 10, 11}
    lines = sorted(r.getMessage() for r in caplog.records
                   if "skipped unreadable shard" in r.getMessage())
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert "000001.tar (ValueError: truncated: 1 of 2 clips)" in lines[0]
    assert "000002.tar (ReadError: invalid header)" in lines[1]
    assert "000005.tar (ReadError: unexpected end of data);" in lines[2]
    assert sorted(line.split("; ")[1] for line in lines) == [
        f"{n} unreadable shard{'s' * (n > 1)} so far in this process" for n in (1, 2, 3)]
    parallel = shards.make_shard_loader(shard_set, 2, workers=2)
    assert len(epoch_clips(parallel, 0)) == 8 and parallel.dataset.unreadable.value == 3

    run_train(broken, *TINY, "--workers", 0, "--batch-size", 2, "--max-steps", 3,
              "--out", tmp_path / "run")
    assert (tmp_path / "run/model.safetensors").exists()


def test_bad_shard_data_is_a_one_line_error(shard_dir, tmp_path):
    with pytest.raises(click.ClickException, match="not a shard of the index"):
        run_train(f"{shard_dir}/000099.tar", *TINY, "--out", tmp_path / "a")
    with pytest.raises(click.ClickException, match="every reader needs a shard"):
        run_train(shard_dir, *TINY, "--workers", 9, "--batch-size", 2, "--out", tmp_path / "b")


def test_missing_webdataset_is_a_one_line_message(shard_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import webdataset fails
    with pytest.raises(click.ClickException, match=r"^reading tar shards needs webdataset: "
                                                   r"pip install webdataset$"):
        run_train(shard_dir, *TINY, "--out", tmp_path / "run")


def test_speed_reports_shards_beside_the_store(store, shard_dir):
    runner = click.testing.CliRunner()
    result = runner.invoke(data.main, ["speed", str(store.root), "--shards", str(shard_dir),
                                       "--workers", "0", "--batch-size", "2", "--batches", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("speed:")]
    assert len(lines) == 2 and "store" in lines[0] and "shards" in lines[1]
    assert all("crops/s with 0 workers (batch 2)" in line for line in lines)
