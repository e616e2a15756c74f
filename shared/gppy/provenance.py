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

    Stages that update a product in place (astrometry, photometry) add to what earlier stages
    wrote instead of replacing it:

    * ``PIPEVER`` software version; ``PIPESTG`` the stages that wrote the file, in order
      (``calib,astrometry,phot``);
    * ``PSET<STG>`` hash of the settings of each stage (``PSETCALI``, ``PSETASTR``...);
    * ``PROVINnn`` input file names (only when ``inputs`` are given);
    * ``TOOLnn`` external tool versions, appended after those already present.
    """
    header["PIPEVER"] = (__version__, "gppy-stack software version")
    stages = [s for s in str(header.get("PIPESTG", "")).split(",") if s]
    if stage not in stages:
        stages.append(stage)
    header["PIPESTG"] = (",".join(stages)[:68], "pipeline stages that wrote this product")
    if settings is not None:
        header[f"PSET{stage[:4].upper()}"] = (settings_hash(settings), f"hash of the {stage} settings")
        header["PIPESET"] = (settings_hash(settings), "settings hash of the last stage")
    for i, path in enumerate(inputs or [], start=1):
        if i <= 99:
            header[f"PROVIN{i:02d}"] = (Path(path).name[:68], "input")
    existing = {str(v).split(" ")[0] for k, v in header.items() if k.startswith("TOOL") and k[4:].isdigit()}
    n = sum(1 for k in header if k.startswith("TOOL") and k[4:].isdigit())
    for tool in tools or []:
        if tool in existing or n >= 99:
            continue
        n += 1
        header[f"TOOL{n:02d}"] = f"{tool} {tool_version(tool)}"[:68]
    return header
