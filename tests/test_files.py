"""files.py: atomic writes, locked and guarded output folders, lossless file names."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import files

REPO = Path(__file__).resolve().parents[1]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "results.json"
    files.write_text(target, "old")

    def failing(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, failing)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp file left


def test_atomic_write_gives_the_usual_mode_even_to_replaced_files(tmp_path):
    """A writer that replaces the temp file with an owner-only one (as safetensors does)
    still yields 0o666 & ~umask."""
    def replacing(tmp):
        os.remove(tmp)
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)

    umask = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "model.safetensors", replacing)
    finally:
        os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_non_utf8_names_round_trip(tmp_path):
    name = os.fsdecode(b"caf\xe9.wav")
    files.write_text(tmp_path / "list.txt", name + "\n")
    assert files.read_text(tmp_path / "list.txt") == name + "\n"
    assert (tmp_path / "list.txt").read_bytes() == b"caf\xe9.wav\n"
    assert files.shown(name) == "caf\\xe9.wav"


def test_output_folder_refuses_foreign_contents_and_leaves_them_as_they_were(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(files.OutputError, match="not empty .*notes.txt.*--overwrite"):
        files.OutputFolder(tmp_path, own=("results.json",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no .lock left behind


def test_output_folder_overwrite_removes_only_its_own_outputs(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "timestamps").mkdir()
    (tmp_path / "timestamps" / "000000.npz").write_bytes(b"x")
    (tmp_path / "embeddings.npy").write_bytes(b"x")
    with files.OutputFolder(tmp_path, own=("timestamps", "embeddings.npy"), overwrite=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [files.LOCK_NAME, "notes.txt"]


def test_output_folder_removes_leftover_temp_files(tmp_path):
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoint.pt").write_bytes(b"ok")
    with files.OutputFolder(tmp_path, resumable=True):
        assert not (tmp_path / ".checkpoint.pt.abc123.tmp").exists()
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"ok"


def test_a_second_process_cannot_take_a_held_folder(tmp_path):
    claim = f"import files; files.OutputFolder({str(tmp_path)!r}, resumable=True)"
    with files.OutputFolder(tmp_path):
        other = subprocess.run([sys.executable, "-c", claim], cwd=REPO, capture_output=True, text=True)
        assert other.returncode != 0 and "in use by another process" in other.stderr
    again = subprocess.run([sys.executable, "-c", claim], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # released on exit


def test_a_file_is_not_an_output_folder(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(files.OutputError, match="not a folder"):
        files.OutputFolder(tmp_path / "out")
