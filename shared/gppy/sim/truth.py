"""Readers for a simulated night's truth files (layout in ``README.md``).

Pipeline tests and the demo's truth comparison use these instead of parsing the files
themselves::

    t = SimTruth(outdir)
    wcs = t.wcs("7DT01_20250116_010645_T14450_m650_1x1_100.0s_0000.fits")
    stars = t.stars(raw_name)            # astropy Table, true positions and fluxes
    zp = t.frame(raw_name)["zp_adu"]
"""

from __future__ import annotations

import json
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning


class SimTruth:
    """The truth of the simulated night under ``root`` (the folder holding ``truth/``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "truth"
        if not (self.dir / "night.json").exists():
            raise FileNotFoundError(f"{self.dir / 'night.json'}: not a simulated night")

    @cached_property
    def night(self) -> dict:
        """``night.json``: unit, night, size, detector, targets, visits, frames, conventions."""
        return json.loads((self.dir / "night.json").read_text())

    @cached_property
    def transients(self) -> list[dict]:
        """``transients.json``: every injected transient with its per-frame positions and fluxes."""
        return json.loads((self.dir / "transients.json").read_text())

    def _stem(self, raw_name: str | Path) -> str:
        name = Path(raw_name).name
        return name[:-5] if name.endswith(".fits") else name

    def frame(self, raw_name: str | Path) -> dict:
        """Per-frame truth (any kind of frame), by raw file name."""
        return json.loads((self.dir / "frames" / f"{self._stem(raw_name)}.json").read_text())

    def stars(self, raw_name: str | Path) -> Table:
        """Stars on a science frame: true ra/dec at mid-exposure, pixel x/y, flux, mag."""
        return Table.read(self.dir / "frames" / f"{self._stem(raw_name)}.stars.csv", format="ascii.csv")

    def mask(self, raw_name: str | Path) -> np.ndarray:
        """uint8 truth mask: 1 cosmic ray, 2 trail, 4 saturated, 8 bad column, 16 hot pixel."""
        with fits.open(self.dir / "frames" / f"{self._stem(raw_name)}.mask.fits") as h:
            return np.asarray(h[1].data)

    def wcs(self, raw_name: str | Path) -> WCS:
        """The true (TPV) WCS of a science frame."""
        hdr = fits.Header.fromstring(self.frame(raw_name)["wcs_header"], sep="\n")
        nx, ny = self.night["size"]
        hdr["NAXIS"], hdr["NAXIS1"], hdr["NAXIS2"] = 2, nx, ny
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            return WCS(hdr)

    def calib(self, what: str) -> np.ndarray:
        """``bias`` (ADU), ``dark_current`` (e-/s) or ``flat_<FILT>`` (median 1), float32."""
        return fits.getdata(self.dir / "calib" / f"{what}.fits")

    def reference(self, ref_name: str | Path) -> dict:
        """Truth of a reference image (MAGZERO, SKYSIG, PSF, WCS, fading sources)."""
        return json.loads((self.dir / "refs" / f"{self._stem(ref_name)}.json").read_text())

    def science_frames(self) -> list[str]:
        return [f["file"] for f in self.night["frames"] if f["kind"] == "science"]
