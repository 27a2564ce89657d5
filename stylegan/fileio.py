"""Small file helpers: atomic writes so that a crash never leaves a half-written file.

A write goes to a temporary file beside its destination, named
`.<destination name>.anostyle-<host>-<pid>-<8 random characters>.tmp`, which is renamed onto
the destination once complete. A killed run leaves its temporary behind; the next write into
the same folder (by any run on that machine) removes those of dead processes of this machine
that are older than the run itself, and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def check_own_folder(dest: str | os.PathLike, owned: Iterable[str]) -> None:
    """Refuse an existing `dest` that holds anything but the files `owned` (a command's own
    output), which `output_folder` would otherwise replace with it."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file, not a folder; give an output folder.")
    stray = sorted(p.name for p in dest.iterdir() if p.name not in set(owned)) \
        if dest.is_dir() else []
    if stray:
        raise UserError(f"{dest} holds files this command does not write ({', '.join(stray[:3])}"
                        f"{' ...' if len(stray) > 3 else ''}); give an output folder of its own, "
                        f"which each run replaces as a whole.")


@contextlib.contextmanager
def output_folder(dest: str | os.PathLike, *, owned: Iterable[str]) -> Iterator[Path]:
    """Yield an empty folder beside `dest` to assemble an output of several files; on success
    it replaces `dest` as one unit (`replace_folder`), so a kill never leaves files of two runs
    side by side. On an exception the folder is removed and `dest` is left as it was.

    `owned`: the names the command writes; an existing `dest` holding others is refused.
    Leftovers of a killed earlier run are cleared first (an older output moved aside but not
    replaced is put back)."""
    dest = Path(dest)
    _clear_leftovers(dest)
    check_own_folder(dest, owned)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".new", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
    try:
        yield tmp
        replace_folder(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, dest: Path) -> None:
    """Move the folder `new` onto `dest`: the old `dest` is renamed aside, `new` renamed in, the
    old one removed; each rename is atomic, and between them `dest` is absent, never mixed."""
    if not dest.exists():
        os.replace(new, dest)
        _fsync_dir(dest.parent)
        return
    old = dest.parent / f".{dest.name}.{time.time_ns()}-{os.getpid()}.old"  # sorts by time
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    _fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def _clear_leftovers(dest: Path) -> None:
    old = sorted(dest.parent.glob(f".{dest.name}.*.old")) if dest.parent.is_dir() else []
    if old and not dest.exists():
        os.replace(old.pop(), dest)  # killed between the two renames: the newest older output
    for leftover in [*old, *dest.parent.glob(f".{dest.name}.*.new")]:
        shutil.rmtree(leftover, ignore_errors=True)


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `dest` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `dest` atomically."""
    atomic_write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def path_from(folder: str | os.PathLike, path: str | os.PathLike) -> str:
    """`path` relative to `folder`, with forward slashes: how a record written into `folder`
    names its inputs, so that no machine's absolute folders end up in a shipped file."""
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


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


# Limits of untrusted JSON (dataset.json, detector.json, prepare.json, checkpoint metadata): far
# beyond anything AnoStyle writes (a few levels of nesting, int64 labels and counts, floats as
# `repr` gives them, under 25 characters), and low enough that a hostile file cannot make the
# parser raise ValueError (Python's 4300-digit limit), OverflowError (an int turned into a
# float or int64 later) or RecursionError (json.loads recurses once per level).
MAX_JSON_DEPTH = 64
MAX_NUMBER_CHARS = 40
_INT64 = 2**63
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class UntrustedJSONError(ValueError):
    """JSON that breaks one of the limits above or is not JSON; the message is one clause."""


def loads_untrusted(text: str | bytes) -> Any:
    """json.loads with the limits above; breaking one raises UntrustedJSONError (a clause
    naming what is wrong, for the caller's sentence that names the file)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UntrustedJSONError(f"it is not UTF-8 text ({exc.reason})") from None
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):  # depth before the recursive parser runs
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise UntrustedJSONError(f"it nests arrays or objects deeper than "
                                         f"{MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1

    def parse_int(digits: str) -> int:
        if len(digits) > MAX_NUMBER_CHARS or not -_INT64 <= int(digits) < _INT64:
            shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"
            raise UntrustedJSONError(f"it holds the integer {shown}, beyond the 64-bit range")
        return int(digits)

    def parse_float(text: str) -> float:
        if len(text) > MAX_NUMBER_CHARS:
            raise UntrustedJSONError(f"it holds a number of {len(text)} characters (at most "
                                     f"{MAX_NUMBER_CHARS})")
        return float(text)

    try:
        return json.loads(text, parse_int=parse_int, parse_float=parse_float)
    except json.JSONDecodeError as exc:
        raise UntrustedJSONError(f"it is not valid JSON ({exc})") from None


def read_user_json(path: str | os.PathLike, *, flag: str, fix: str):
    """The JSON body of a file the user named with `flag`; a missing or unreadable file, or one
    beyond the limits of `loads_untrusted`, ends in one sentence that ends with `fix`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist; {fix}.")
    try:
        return loads_untrusted(path.read_bytes())
    except UntrustedJSONError as exc:
        raise UserError(f"{flag} {path} cannot be read: {exc}; {fix}.") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (what model folders and detectors
    record to pair files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
