"""Typed, checked reading of TOML tables: every value read names its field, unknown keys
are reported (usually typos), and sizes and paths are read one way for every file the
project reads (job files, testbeds, profiles)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


class JobError(ValueError):
    """A problem with the job file, phrased for the user: the field, what is wrong, the fix."""


def parse_bytes(value: Any, where: str) -> int:
    """24GiB, 512MB, 1.5e9 or a plain integer -> bytes."""
    if isinstance(value, bool):
        raise JobError(f"{where}: expected a size such as 8GiB or 512MB, got {value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise JobError(f"{where}: a size must be positive, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", str(value))
    if not m:
        raise JobError(f"{where}: cannot read {value!r} as a size; write e.g. 8GiB or 512MB")
    number = float(m.group(1))
    unit = (m.group(2) or "").lower()
    scale = {
        "": 1,
        "k": 1e3,
        "m": 1e6,
        "g": 1e9,
        "t": 1e12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }[unit]
    if number <= 0:
        raise JobError(f"{where}: a size must be positive, got {value!r}")
    return int(number * scale)


class Section:
    """Typed access to one TOML table that remembers which keys were read, so unknown keys
    (usually typos) are reported instead of silently ignored."""

    def __init__(self, data: Any, name: str):
        if not isinstance(data, dict):
            raise JobError(f"[{name}] must be a table, got {type(data).__name__}")
        self.data, self.name, self.seen = data, name, set()

    def _where(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def get(self, key: str, kind: type | tuple, default: Any = None, *, required: bool = False):
        self.seen.add(key)
        if key not in self.data:
            if required:
                raise JobError(f"{self._where(key)} is missing; add it to the job file")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML has no int/float distinction worth punishing: accept 2 where 2.0 is expected.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise JobError(
                f"{self._where(key)}: expected {names}, got {type(value).__name__} {value!r}"
            )
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise JobError(
                f"{self._where(key)}: {value!r} is not one of {', '.join(map(repr, options))}"
            )
        return value

    def positive(self, key: str, default: int, *, zero_ok: bool = False) -> int:
        value = self.get(key, int, default)
        if value < 0 or (value == 0 and not zero_ok):
            bound = ">= 0" if zero_ok else ">= 1"
            raise JobError(f"{self._where(key)}: must be an integer {bound}, got {value}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise JobError(
                f"unknown field(s) in [{self.name or 'top level'}]: {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(self.seen))}"
            )


def expand_path(value: str, base: Path, where: str) -> Path:
    """Expand ~ and $VARS; a relative path is relative to the job file's folder (so a job
    means the same thing whatever directory mpiexec starts in)."""
    missing = [v for v in re.findall(r"\$\{?(\w+)\}?", value) if v not in os.environ]
    if missing:
        raise JobError(
            f"{where}: {value!r} uses ${missing[0]}, which is not set; export it (e.g. "
            f"export {missing[0]}=/path/to/data) or write the path out"
        )
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    return path if path.is_absolute() else (base / path).resolve()
