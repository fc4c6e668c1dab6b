"""Result files that are never overwritten, never half-written, never outside their folder.

Every file the project writes for the user (run HDF5 files, profiles, journals) is written
to a temporary name in the target folder and then *linked* to its real name: link(2)
fails when the name exists, where rename(2) would silently replace it. Two runs that race
for one name (the `{time}` stamp has one-second resolution) therefore both keep their
results: the second gets `name-2.h5`. Folders are created only when a file is written,
so a run refused at start-up leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

MAX_TRIES = 1000
_in_flight: set[str] = set()
"""Temporary files being written now: removed by abandon() when the process must die."""


def abandon() -> None:
    """Remove every half-written file of this process (called before a forced exit)."""
    for tmp in list(_in_flight):
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class OutputError(OSError):
    """A results file could not be written; the message is one line for the user."""


def file_mode() -> int:
    """0666 minus the umask: what open(2) would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def writable_folder(folder: Path) -> str | None:
    """None if files can be created in `folder` (or in the folders that would be made for
    it); else why not. Creates nothing."""
    p = folder.resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


def candidates(path: Path):
    """path, then path-2, path-3, ... (before the suffix: run.h5 -> run-2.h5)."""
    yield path
    suffix = "".join(path.suffixes[-1:])
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    for i in range(2, MAX_TRIES):
        yield path.with_name(f"{stem}-{i}{suffix}")


def free_name(path: Path) -> Path:
    """The first candidate name not taken now (a hint: publish() is what decides)."""
    for c in candidates(path):
        if not c.exists() and not os.path.lexists(c):
            return c
    raise OutputError(errno.EEXIST, f"{path}: {MAX_TRIES} names taken; clean the folder")


def publish(write: Callable[[Path], None], path: Path, *, rename_ok: bool = True) -> Path:
    """Write a file with `write(tmp_path)` and give it `path`, or, if that name is taken
    (another run got there first), the next free `name-N`; with rename_ok=False a taken
    name is an error instead. Never replaces a file. Returns the name used."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        _in_flight.add(tmp)
    except OSError as e:
        raise OutputError(e.errno, f"cannot create a file in {path.parent}: {e.strerror}") from None
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        for c in candidates(path) if rename_ok else (path,):
            try:
                os.link(tmp, c)
                return c
            except FileExistsError:
                continue
        raise OutputError(
            errno.EEXIST,
            f"{path} already exists; results are never overwritten: remove it or choose "
            "another name",
        )
    except (OSError, RuntimeError) as e:  # h5py reports a full disk as either
        if isinstance(e, OutputError):
            raise
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OutputError(getattr(e, "errno", None), f"cannot write {path}: {why}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
        _in_flight.discard(tmp)


def inside(folder: Path, path: Path) -> bool:
    """Whether `path` stays within `folder` once `..` and links are resolved."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True
