"""Readers for v1's configuration tables, in their v1 formats (v1-behaviour.md §1.2-1.3, §3.4).

``obs.dat`` (whitespace table ``obs ccd gain RDnoise dark pixelscale fov``), ``changehdr.dat``
(``key val newval``; ``#`` comments; quoted values may hold spaces), ``alltarget.dat`` and
``keys.dat`` (``name key pw``; never committed).
"""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path

from astropy.io import fits


def _rows(path: Path) -> list[list[str]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith(("'", '"')) else line.strip()
        if not line:
            continue
        rows.append(shlex.split(line))
    return rows


def read_table(path: Path) -> list[dict[str, str]]:
    """A whitespace table with a header row, as dicts."""
    rows = _rows(path)
    if not rows:
        return []
    head = rows[0]
    return [dict(zip(head, r, strict=False)) for r in rows[1:]]


def default_table(name: str) -> Path:
    """Path of a table shipped with the package (``gppy/data/<name>``)."""
    return Path(str(resources.files("gppy") / "data" / name))


def load_changehdr(path: Path | None = None) -> list[tuple[str, str, str]]:
    """Rules ``(key, val, newval)`` in file order."""
    rows = read_table(path or default_table("changehdr.dat"))
    return [(r["key"], r["val"], r["newval"]) for r in rows if {"key", "val", "newval"} <= r.keys()]


def apply_changehdr(header: fits.Header, rules: list[tuple[str, str, str]]) -> list[str]:
    """Apply the rules in order (v1 §3.4): if ``header[key] == val`` set it to ``newval``.

    Values are compared as stripped strings. Returns a list of the changes made.
    """
    changes = []
    for key, val, newval in rules:
        if key in header and str(header[key]).strip() == val:
            header[key] = newval
            changes.append(f"{key}: {val!r} -> {newval!r}")
    return changes


def load_obs(path: Path | None = None) -> dict[str, dict[str, str]]:
    """``obs.dat`` rows keyed by observatory code (``7DT01``...)."""
    return {r["obs"]: r for r in read_table(path or default_table("obs.dat"))}


def load_keys(path: Path | None) -> dict[str, str]:
    """``keys.dat`` (``name key pw``) -> {name: key}. Missing file: empty."""
    if path is None or not Path(path).exists():
        return {}
    return {r["name"].lower(): r.get("key", "") for r in read_table(path)}
