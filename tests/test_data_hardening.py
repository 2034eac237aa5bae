"""Tests for data.py on hostile inputs: special files, odd names, empty folders, stale caches.

Every test builds its own few short clips with numpy + soundfile.
"""
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audio
import data

REPO = Path(__file__).resolve().parents[1]


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (opening a FIFO blocks until someone writes to it)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a special file was opened?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def special_folder(folder: Path) -> dict[str, str]:
    """good.wav, a link to a clip outside, and one of each kind of non-regular entry.
    Returns {name: words its reason must contain} for the entries to be skipped."""
    folder.mkdir(parents=True)
    sf.write(folder / "good.wav", noise(1.0), 16000)
    outside = folder.parent / "outside"
    outside.mkdir()
    sf.write(outside / "real.wav", noise(1.0, seed=1), 16000)
    os.symlink(outside / "real.wav", folder / "linked.wav")
    os.mkfifo(folder / "pipe.wav")
    os.symlink(folder / "missing.wav", folder / "dangling.wav")
    os.symlink("loop.wav", folder / "loop.wav")
    os.symlink("/dev/zero", folder / "zero.wav")
    return {"pipe.wav": "not a regular file (FIFO)", "dangling.wav": "broken symbolic link",
            "loop.wav": "symbolic link loop", "zero.wav": "not a regular file (character device)"}


# ---------------------------------------------------------------------------
# 1. Files that are not regular files
# ---------------------------------------------------------------------------


def test_find_files_skips_special_files_under_the_users_names(tmp_path):
    folder = tmp_path / "audio"
    expected = special_folder(folder)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.wav"))
    expected["sock.wav"] = "not a regular file (socket)"
    skipped = {}
    with deadline(20), server:
        found = audio.find_files([folder], skipped=skipped)
    assert found == [str(folder / "good.wav"), str(folder / "linked.wav")]  # the link's own name
    assert skipped == {str(folder / name): reason for name, reason in expected.items()}


def test_find_files_logs_skipped_entries_without_a_dict(tmp_path, caplog):
    folder = tmp_path / "audio"
    special_folder(folder)
    with deadline(20):
        found = audio.find_files([folder])
    assert len(found) == 2
    assert str(folder / "pipe.wav") in caplog.text and "broken symbolic link" in caplog.text


def test_find_files_lists_a_file_once_under_the_name_the_user_has(tmp_path):
    folder = tmp_path / "audio"
    (folder / "sub").mkdir(parents=True)
    sf.write(folder / "sub" / "a.wav", noise(0.5), 16000)
    os.symlink(folder, folder / "sub" / "up")  # a folder link back up the tree
    os.symlink(folder / "sub" / "a.wav", folder / "sub" / "b.wav")  # a second name of a.wav
    with deadline(20):
        found = audio.find_files([folder, folder / "sub", folder / "sub" / "a.wav"])
    assert found == [str(folder / "sub" / "a.wav")]
    relative = os.path.relpath(folder, Path.cwd())
    assert audio.find_files([relative]) == [str(folder / "sub" / "a.wav")]  # absolute, not resolved


def test_find_files_reports_an_unreadable_folder(tmp_path, monkeypatch):
    folder = tmp_path / "audio"
    (folder / "locked").mkdir(parents=True)
    sf.write(folder / "a.wav", noise(0.5), 16000)
    listdir = os.listdir

    def refuse_locked(path):  # chmod 000 does not stop root, so refuse like the kernel would
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse_locked)
    skipped = {}
    assert audio.find_files([folder], skipped=skipped) == [str(folder / "a.wav")]
    assert skipped == {str(folder / "locked"): "unreadable folder (Permission denied)"}


def test_load_audio_refuses_special_files_under_the_name_given(tmp_path):
    os.mkfifo(tmp_path / "pipe.wav")
    os.symlink(tmp_path / "gone.wav", tmp_path / "dangling.wav")
    cases = {"/dev/zero": "character device", str(tmp_path / "pipe.wav"): "FIFO",
             str(tmp_path / "dangling.wav"): "broken symbolic link"}
    for path, words in cases.items():
        with deadline(20), pytest.raises(audio.AudioError) as caught:
            audio.load_audio(path)
        assert caught.value.path == path and words in caught.value.reason


def test_prepare_lists_special_files_as_bad(tmp_path):
    folder = tmp_path / "audio"
    expected = special_folder(folder)
    with deadline(60):
        summary = data.prepare([folder], tmp_path / "store", progress=False)
        again = data.prepare([folder], tmp_path / "store", progress=False)
    assert (summary.added, summary.bad, summary.total) == (2, len(expected), 2)
    assert (again.added, again.bad, again.resumed) == (0, 0, 2 + len(expected))
    assert [entry["path"] for entry in data.read_index(tmp_path / "store")] == [
        str(folder / "good.wav"), str(folder / "linked.wav")]
    assert data.read_bad_files(tmp_path / "store") == {
        str(folder / name): reason for name, reason in expected.items()}


# ---------------------------------------------------------------------------
# 2. File names that are not UTF-8
# ---------------------------------------------------------------------------


def test_prepare_keeps_non_utf8_names_exactly(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "good.wav", noise(1.0), 16000)
    (folder / "bad.wav").write_text("not audio")
    good = os.fsdecode(os.fsencode(folder) + b"/caf\xe9.wav")
    bad = os.fsdecode(os.fsencode(folder) + b"/\xff\xfe.wav")
    os.rename(folder / "good.wav", good)
    os.rename(folder / "bad.wav", bad)
    store = tmp_path / "store"
    for run in range(2):  # the second run reads back what the first wrote
        summary = data.prepare([folder], store, progress=False)
        assert summary.total == 1 and summary.resumed == 2 * run
    assert [entry["path"] for entry in data.read_index(store)] == [good]
    assert list(data.read_bad_files(store)) == [bad]
    assert b"\xff\xfe.wav" in (store / data.BAD_FILE).read_bytes()  # the name's own bytes
    assert audio.load_audio(good).shape == (16000,)


# ---------------------------------------------------------------------------
# 3. Atomic store.json
# ---------------------------------------------------------------------------


def test_store_json_is_never_left_half_written(tmp_path, monkeypatch):
    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "a.wav", noise(1.0), 16000)
    write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError):
        data.prepare([folder], tmp_path / "store", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "store" / data.META_FILE).exists()
    assert data.prepare([folder], tmp_path / "store", progress=False).total == 1


# ---------------------------------------------------------------------------
# 4. The cached store of audio folders follows their content
# ---------------------------------------------------------------------------


def write_clips(folder: Path) -> None:
    folder.mkdir()
    for number, seconds in enumerate((1.0, 1.5, 2.0)):
        sf.write(folder / f"clip{number}.wav", noise(seconds, seed=number), 16000)


def test_cached_store_follows_deleted_and_rewritten_files(tmp_path):
    folder, cache = tmp_path / "audio", tmp_path / "cache"
    write_clips(folder)
    first = data.open_or_prepare_store([folder], cache_dir=cache)
    assert len(first) == 3
    (folder / "clip1.wav").unlink()
    new_audio = noise(0.5, seed=9)
    sf.write(folder / "clip2.wav", new_audio, 16000)
    stat = (folder / "clip2.wav").stat()
    os.utime(folder / "clip2.wav", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = data.open_or_prepare_store([folder], cache_dir=cache)
    paths = [entry["path"] for entry in data.read_index(second.root)]
    assert paths == [str(folder / "clip0.wav"), str(folder / "clip2.wav")]
    expected = audio.LogMel()(torch.from_numpy(new_audio)).numpy()  # (51, 80)
    np.testing.assert_allclose(second.log_mel(1).astype(np.float32), expected, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("cache_inside", [False, True])
def test_cached_store_of_unchanged_folders_is_reused(tmp_path, cache_inside):
    folder = tmp_path / "audio"
    cache = folder / "cache" if cache_inside else tmp_path / "cache"
    write_clips(folder)
    first = data.open_or_prepare_store([folder], cache_dir=cache)
    index_before = (first.root / data.INDEX_FILE).stat().st_mtime_ns
    second = data.open_or_prepare_store([folder], cache_dir=cache)
    assert second.root == first.root and len(second) == 3
    assert (second.root / data.INDEX_FILE).stat().st_mtime_ns == index_before
    assert [p.name for p in cache.iterdir()] == [first.root.name]


# ---------------------------------------------------------------------------
# 5. Empty and audio-less folders, the prepare command
# ---------------------------------------------------------------------------


def test_prepare_refuses_a_folder_without_files(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no audio files found under .*empty"):
        data.prepare([tmp_path / "empty"], tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match="no audio files found under"):
        data.open_or_prepare_store([tmp_path / "empty"], cache_dir=tmp_path / "cache")


def test_prepare_refuses_a_folder_without_readable_audio(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "notes.txt").write_text("not audio")
    sf.write(folder / "silent.wav", np.zeros(1600, np.float32), 16000)
    store = tmp_path / "store"
    message = (f"no readable audio under {folder}: 2 files skipped "
               f"(see {store / data.BAD_FILE})")
    for _ in range(2):  # also when a rerun finds everything already listed as bad
        with pytest.raises(ValueError) as caught:
            data.prepare([folder], store, progress=False)
        assert str(caught.value) == message
    with pytest.raises(ValueError, match="no readable audio under .*2 files skipped"):
        data.open_or_prepare_store([folder], cache_dir=tmp_path / "cache")


def run_data_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "data.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_prepare_command_on_an_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_data_cli("prepare", str(tmp_path / "empty"), "--out", str(tmp_path / "store"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    expected = f"Error: no audio files found under {tmp_path / 'empty'}"
    assert result.stderr.strip().splitlines() == [expected]


def test_prepare_command_prints_its_summary_once_with_plurals(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "a.wav", noise(1.0), 16000)
    (folder / "notes.txt").write_text("not audio")
    result = run_data_cli("prepare", str(folder), "--out", str(tmp_path / "store"),
                          "--workers", "1")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("already done") == 1
    assert "1 clip added" in output and "1 bad file (see" in output and "holds 1 clip" in output


def test_every_option_of_the_data_commands_has_help():
    for name, command in data.main.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"data.py {name} {param.opts[0]} has no help text"


# ---------------------------------------------------------------------------
# 6. The finiteness check that embedding code shares
# ---------------------------------------------------------------------------


def test_check_finite_names_the_file():
    audio.check_finite(torch.zeros(3, 80), "fine.wav")
    audio.check_finite(np.zeros((2, 3, 80)), "fine.wav")
    for bad in (torch.tensor([[0.0, float("inf")]]), np.array([np.nan])):
        with pytest.raises(audio.AudioError) as caught:
            audio.check_finite(bad, "loud.wav")
        assert caught.value.path == "loud.wav" and "log-mel not finite" in caught.value.reason
