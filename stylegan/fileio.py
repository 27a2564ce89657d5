"""Small file helpers: atomic writes so that a crash never leaves a half-written file.

A write goes to a temporary file beside its destination, named
`.<destination name>.anostyle-<host>-<pid>-<8 random characters>.tmp`, which is renamed onto
the destination once complete. A killed run leaves its temporary behind; the next write into
the same folder (by any run on that machine) removes those of dead processes of this machine
that are older than the run itself, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from stylegan.errors import UserError

_STARTED = time.time()  # when this run started: older temporaries of dead runs are stale
_TEMPORARY = re.compile(r"^\..+\.anostyle-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{8}\.tmp$")
_swept: set[Path] = set()  # folders this run has cleaned


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed onto `dest`.

    On an exception the temporary file is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.anostyle-{_host()}-{os.getpid()}-",
                               suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and a writer may replace the file (safetensors does): give the
        # finished file the permissions of any other output, after writing
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `dest` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `dest` atomically."""
    atomic_write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def remove_stale_temporaries(folder: Path, *, force: bool = False) -> list[Path]:
    """Remove the temporaries that killed runs of this machine left in `folder` (once per run
    and folder unless `force`): only names of atomic_path's pattern, written by a process that
    no longer runs, last modified before this run started. Returns what was removed."""
    folder = Path(folder).resolve()
    if folder in _swept and not force:
        return []
    _swept.add(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        found = _TEMPORARY.match(entry.name)
        if not found or found["host"] != _host() or _running(int(found["pid"])):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and \
                    entry.stat(follow_symlinks=False).st_mtime < _STARTED:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # removed meanwhile, or not ours to remove
            pass
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _running(pid: int) -> bool:
    """True if a process `pid` runs on this machine (or cannot be told apart from one)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_user_json(path: str | os.PathLike, *, flag: str, fix: str):
    """The JSON body of a file the user named with `flag`; a missing or unreadable file ends in
    one sentence that ends with `fix` (what to give instead)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist; {fix}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{flag} {path} is not valid JSON ({exc}); {fix}.") from None
