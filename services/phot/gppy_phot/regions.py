"""DS9 region files (fk5 circles)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def circles(ra: Iterable[float], dec: Iterable[float], radius_arcsec: float, color: str = "green",
            labels: Iterable[str] | None = None) -> list[str]:
    """``circle(ra,dec,r")`` lines with a colour and optional text labels."""
    out = []
    labs = list(labels) if labels is not None else None
    for i, (a, d) in enumerate(zip(ra, dec, strict=True)):
        if not (np.isfinite(a) and np.isfinite(d)):
            continue
        text = f" text={{{labs[i]}}}" if labs is not None else ""
        out.append(f'circle({a:.7f},{d:.7f},{radius_arcsec:.2f}") # color={color}{text}')
    return out


def region_text(lines: list[str], comment: str = "") -> str:
    """A DS9 region file from shape lines (fk5)."""
    head = ["# Region file format: DS9 version 4.1"]
    if comment:
        head.append(f"# {comment}")
    head += ['global color=green dashlist=8 3 width=1 font="helvetica 10 normal roman" select=1 '
             "highlite=1 dash=0 fixed=0 edit=1 move=1 delete=1 include=1 source=1", "fk5"]
    return "\n".join(head + lines) + "\n"


def phot_regions(table, seeing_arcsec: float) -> str:
    """Regions of a photometric catalogue: every source (green), ZP stars kept (blue) and
    clipped (red), radius = the seeing."""
    ra = np.asarray(table["ALPHA_J2000"], float)
    dec = np.asarray(table["DELTA_J2000"], float)
    zps = np.asarray(table["ZPSTAR"], bool) if "ZPSTAR" in table.colnames else np.zeros(len(ra), bool)
    kept = np.asarray(table["ZPKEPT"], bool) if "ZPKEPT" in table.colnames else np.zeros(len(ra), bool)
    r = max(float(seeing_arcsec), 1.0)
    lines = circles(ra[~zps], dec[~zps], r, "green")
    lines += circles(ra[zps & kept], dec[zps & kept], r * 1.5, "blue")
    lines += circles(ra[zps & ~kept], dec[zps & ~kept], r * 1.5, "red")
    return region_text(lines, "gppy phot: sources (green), ZP stars kept (blue) / clipped (red)")
