"""Atomic file writes: a killed run never leaves a half-written file under its final name, and a failed write
(full disk, read-only dir) leaves an existing file intact. Output paths are checked before the work starts, so a
long run never dies at its final write.
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from parity.errors import ParityError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ParityError(f"{path}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ParityError(f"{path}: cannot write ({e.strerror or e}); nothing was replaced") from None
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output_dir(path: Path, option: str, *, must_be_empty: bool = False) -> None:
    """Refuse, before any work, a dir that an option names for output but that cannot be used: a file in the way,
    a non-empty dir where an empty one is needed, or no permission to create or write it."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ParityError(f"{option} {path}: exists and is not a directory")
        if must_be_empty and any(path.iterdir()):
            raise ParityError(f"{option} {path}: exists and is not empty (needs an empty or new dir)")
    _check_writable(path, option)


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, a file path an option names for output that cannot be written (atomically)."""
    path = Path(path)
    if path.is_dir():
        raise ParityError(f"{option} {path}: is a directory, expected a file path")
    _check_writable(path.parent, option, for_path=path)


def _check_writable(path: Path, option: str, for_path: Path | None = None) -> None:
    """`path` (a dir) or its nearest existing ancestor must be a dir we can create files in: probed, since
    permission bits do not tell (root, ACLs, read-only mounts)."""
    target = for_path or path
    existing = path
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ParityError(f"{option} {target}: cannot be created, {existing} is a file")
        with tempfile.TemporaryFile(dir=existing, prefix=".parity-probe-"):
            pass
    except OSError as e:
        raise ParityError(f"{option} {target}: cannot write in {existing} ({e.strerror or e})") from None


def read_json(path: Path, missing: str, unreadable: str):
    """The JSON document in `path`; a missing or unreadable file is one ParityError: `missing`, or `unreadable`
    with the decoder's reason appended in parentheses."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ParityError(missing) from None
    except OSError as e:
        raise ParityError(f"{unreadable} ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ParityError(f"{unreadable} ({e})") from None
