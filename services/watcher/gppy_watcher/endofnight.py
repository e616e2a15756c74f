"""What happens when a night ends (v1-behaviour.md §11.2, §11.4).

* v1's per-unit run log ``<path_log>/<unit>.log``: CSV ``date,start,end,note``, one line per
  night, ``date`` being the absolute night folder and the times ``YYYY-MM-DD_HH:MM:SS_(KST)``
  (v1 forces ``TZ=Asia/Seoul``). The file is created with its header when missing.
* Header snapshots: ``imhead`` (WCSTools) of every image product, saved as
  ``<stem>.head`` in the ``header/`` folder of the product's ``<OBJ>/<UNIT>/<FILT>`` tree.
  v1 wrote them to whichever folder came first (bug B2); here each goes to its own.
* A machine-readable night summary ``<path_processed>/nights/<night_id>.json``: frames,
  products, failures and per-stage timings (v1's ``obs.summary.log`` missed several stages
  and lost one to a typo, bug B20).
* The night's scratch folder is removed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from gppy import naming
from gppy.fitsio import write_text
from gppy.tools import ToolError, run_tool

log = logging.getLogger(__name__)

KST = timezone(timedelta(hours=9), "KST")
LOG_HEADER = ["date", "start", "end", "note"]


def kst_stamp(t: float) -> str:
    """A Unix time as v1 wrote it in the run log: ``YYYY-MM-DD_HH:MM:SS_(KST)``."""
    return datetime.fromtimestamp(t, KST).strftime("%Y-%m-%d_%H:%M:%S") + "_(KST)"


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def append_unit_log(path: Path, night_dir: str, start: float, end: float, note: str) -> str:
    """Append one ``date,start,end,note`` line (file created with the header if missing).

    Returns the line written. Commas or quotes in ``note`` are CSV-quoted.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        writer.writerow(LOG_HEADER)
    row = [str(night_dir), kst_stamp(start), kst_stamp(end), (note or "-").replace("\n", " ")[:300]]
    writer.writerow(row)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(buf.getvalue())
    return ",".join(row)


def logged_nights(path: Path) -> set[str]:
    """Night folders named in the ``date`` column of a v1 run log (absolute paths)."""
    if not path.exists():
        return set()
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            return {row["date"].strip().rstrip("/") for row in csv.DictReader(fh) if row.get("date")}
    except (OSError, csv.Error, KeyError) as exc:
        log.warning("cannot read the run log %s: %s", path, exc)
        return set()


def header_dir(product: Path) -> Path:
    """The ``header/`` folder of a product's ``<OBJ>/<UNIT>/<FILT>`` tree."""
    base = product.parent
    while base.name in ("transient", "fits_image", "png_image", "phot"):
        base = base.parent
    return base / "header"


def snapshot_headers(products: list[str], processed_root: Path, timeout: float = 60.0) -> tuple[list[str], list[str]]:
    """Run ``imhead`` on every product that exists below ``processed_root``.

    Returns ``(written .head files, problems)``; a problem never stops the others.
    """
    written: list[str] = []
    problems: list[str] = []
    root = Path(processed_root).resolve()
    for p in dict.fromkeys(products):
        path = Path(p)
        if not path.exists():
            problems.append(f"{path.name}: missing")
            continue
        if root not in path.resolve().parents:
            problems.append(f"{path}: outside the processed tree, no snapshot")
            continue
        try:
            proc = run_tool("imhead", [str(path)], timeout=timeout)
        except ToolError as exc:
            problems.append(f"{path.name}: {exc}")
            continue
        dest = header_dir(path) / f"{naming.stem(path)}.head"
        write_text(dest, proc.stdout)
        written.append(str(dest))
    return written, problems


def write_summary(dest: Path, summary: dict) -> Path:
    """Write the night summary JSON atomically."""
    return write_text(dest, json.dumps(summary, indent=1, sort_keys=False, default=str) + "\n")


def summary_path(processed_root: Path, night_id: str) -> Path:
    """``<path_processed>/nights/<night_id>.json`` (each ``_``-separated field sanitised)."""
    safe = "_".join(naming.sanitize(p, "night id") for p in night_id.split("_") if p.strip())
    return Path(processed_root) / "nights" / f"{safe}.json"


def remove_scratch(scratch_root: Path, unit: str, night_dir: str) -> Path | None:
    """Remove ``<path_scratch>/<UNIT>/<night>/``; returns it if it existed."""
    d = naming.scratch_dir(scratch_root, unit, night_dir)
    root = Path(scratch_root).resolve()
    if not d.exists() or root not in d.resolve().parents:
        return None
    shutil.rmtree(d, ignore_errors=True)
    return d
