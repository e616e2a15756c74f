"""Provenance: one record per product, written the same way into headers and events."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from astropy.io import fits

from gppy import __version__


def settings_hash(settings: dict) -> str:
    """Short, stable hash of the settings that affect a product."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@lru_cache(maxsize=16)
def tool_version(binary: str) -> str:
    """Version string of an external tool (``source-extractor``, ``scamp``, ``SWarp``...)."""
    exe = shutil.which(binary)
    if exe is None:
        return "absent"
    for args in ([exe, "-v"], [exe, "--version"]):
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (out.stdout + out.stderr).strip().splitlines()
        for line in text:
            if "version" in line.lower():
                return line.strip()[:60]
    return "unknown"


def stamp(header: fits.Header, stage: str, inputs: list[str | Path] | None = None,
          settings: dict | None = None, tools: list[str] | None = None) -> fits.Header:
    """Write provenance keywords into ``header`` (in place) and return it.

    ``PIPEVER`` software version, ``PIPESTG`` stage, ``PIPESET`` settings hash, ``PROVIN##``
    input file names (HISTORY for the full paths), ``TOOL##`` external tool versions.
    """
    header["PIPEVER"] = (__version__, "gppy-stack software version")
    header["PIPESTG"] = (stage, "pipeline stage that wrote this product")
    if settings is not None:
        header["PIPESET"] = (settings_hash(settings), "hash of the settings affecting it")
    for i, path in enumerate(inputs or [], start=1):
        if i <= 99:
            header[f"PROVIN{i:02d}"] = (Path(path).name[:68], "input")
    for i, tool in enumerate(tools or [], start=1):
        header[f"TOOL{i:02d}"] = (f"{tool} {tool_version(tool)}"[:68], "external tool")
    return header
