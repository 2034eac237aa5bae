"""Writing files safely: atomic replacement, locked output folders, lossless file names.

Every file this project writes goes through `atomic_write`: the bytes go to a temporary file
beside the target, are flushed to disk (fsync), and the temporary file is renamed over the
target (then the folder entry is fsync'd too). A crash, SIGKILL or full disk at any moment
leaves either the old file or the new one, never a mix. A process killed mid-write leaves its
temporary file behind (`.NAME.*.tmp`); `OutputFolder` removes those when it next takes the
folder, which is safe because it holds the folder's lock.

`OutputFolder` is how a command claims its `--out`: a lock file (a second process on the same
folder fails at once) and a refusal to write into a folder that holds something else than this
command's own resumable work, unless the user passes `--overwrite`.

File names are kept as the operating system gives them: a name that is not valid UTF-8 is held
as a str with surrogate escapes (os.fsdecode) and written with errors="surrogateescape", so
the bytes come back exactly; `shown` makes such a name printable for messages.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), fsync the file, rename it over `path` and fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes owner-only files (and some writers replace the file with one of
        # their own): give the result the usual mode, as open() would.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Text, atomically; names held with surrogate escapes are written back as their bytes."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))


def write_json(path: str | Path, value) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def read_text(path: str | Path) -> str:
    """The inverse of write_text (file names come back with the same surrogate escapes)."""
    return Path(path).read_text(encoding="utf-8", errors="surrogateescape")


def shown(path: str | Path) -> str:
    """A path as text that can always be printed (undecodable bytes as \\xNN)."""
    return os.fsencode(os.fspath(path)).decode("utf-8", errors="backslashreplace")


def holds_only(folder: str | Path, names) -> bool:
    """True if `folder` holds nothing but files named in `names`, its lock and temporary files
    atomic_write left (a command's own work, e.g. a run killed before its first checkpoint)."""
    ours = {*names, LOCK_NAME}
    return all(path.name in ours or path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)
               for path in Path(folder).iterdir())


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files atomic_write left in `folder` (a process killed mid-write).
    Only call this while holding the folder's lock (OutputFolder does)."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class OutputError(Exception):
    """An output folder that cannot be used (locked by another process, or holds other work)."""


class OutputFolder:
    """Claim `folder` for one command: take its lock, refuse foreign contents, clean leftovers.

    own: names (files or sub-folders) this command writes there. The folder is accepted when it
    is missing or empty, when `resumable` is true (the caller found its own resumable state
    there), or when `overwrite` is true; otherwise OutputError names what is in the way. Files
    named in `own` are deleted first when `overwrite` is set, so no stale output survives.
    The lock is an flock on FOLDER/.lock, released when the process exits (even by SIGKILL).
    """

    def __init__(self, folder: str | Path, own: Iterable[str] = (), resumable: bool = False,
                 overwrite: bool = False):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"{shown(self.folder)} exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        lock_existed = (self.folder / LOCK_NAME).exists()
        self._lock = open(self.folder / LOCK_NAME, "a")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise OutputError(f"{shown(self.folder)} is in use by another process (lock {LOCK_NAME} held)") from None
        remove_temp_files(self.folder)
        contents = sorted(p.name for p in self.folder.iterdir() if p.name != LOCK_NAME)
        if contents and not resumable:
            if not overwrite:
                if not lock_existed:  # leave the refused folder as it was
                    (self.folder / LOCK_NAME).unlink()
                self.release()
                listed = ", ".join(shown(name) for name in contents[:5]) + (", ..." if len(contents) > 5 else "")
                raise OutputError(f"{shown(self.folder)} is not empty ({listed}): choose a new --out, "
                                  f"or pass --overwrite to replace this command's outputs there")
            for name in own:
                self.remove(name)

    def remove(self, name: str) -> None:
        target = self.folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()

    def release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
