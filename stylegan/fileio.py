"""Small file helpers: atomic writes so that a crash never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from stylegan.errors import UserError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is fsynced and renamed onto `dest`.

    On an exception the temporary file is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp_path
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
