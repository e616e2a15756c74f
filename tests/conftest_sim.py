"""Helpers for the simulator tests: one small simulated night per test module, a Source
Extractor runner, and calibration of raw frames with the simulator's *true* bias/dark/flat."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from gppy.tools import run_tool


@dataclass
class SimNight:
    root: Path
    truth: dict

    @property
    def night_dir(self) -> Path:
        return Path(self.truth["night_dir"])

    def frame_truth(self, name: str) -> dict:
        return json.loads((self.root / "truth" / "frames" / f"{Path(name).stem}.json").read_text())

    def stars(self, name: str) -> Table:
        return Table.read(self.root / "truth" / "frames" / f"{Path(name).stem}.stars.csv", format="ascii.csv")

    def mask(self, name: str) -> np.ndarray:
        with fits.open(self.root / "truth" / "frames" / f"{Path(name).stem}.mask.fits") as h:
            return np.asarray(h[1].data)

    def frames(self, kind: str, **match) -> list[str]:
        out = []
        for f in self.truth["frames"]:
            if f["kind"] == kind and all(f.get(k) == v for k, v in match.items()):
                out.append(f["file"])
        return out

    def raw(self, name: str) -> tuple[np.ndarray, fits.Header]:
        with fits.open(self.night_dir / name) as h:
            return np.asarray(h[0].data, dtype=np.float64), h[0].header.copy()

    def calib_truth(self, what: str) -> np.ndarray:
        return fits.getdata(self.root / "truth" / "calib" / f"{what}.fits").astype(np.float64)

    def calibrated(self, name: str) -> np.ndarray:
        """(raw - true bias - frame bias offset - true dark) / true flat, in ADU."""
        raw, hdr = self.raw(name)
        t = self.frame_truth(name)
        bias = self.calib_truth("bias") + t["bias_offset_adu"]
        dark = self.calib_truth("dark_current") * hdr["EXPTIME"] / t["gain_e_per_adu"]
        flat = self.calib_truth(f"flat_{hdr['FILTER']}")
        return (raw - bias - dark) / flat


def load_night(root: Path) -> SimNight:
    return SimNight(root, json.loads((root / "truth" / "night.json").read_text()))


SEX_PARAMS = ["NUMBER", "XWIN_IMAGE", "YWIN_IMAGE", "ERRAWIN_IMAGE", "X_IMAGE", "Y_IMAGE", "FLUX_AUTO",
              "FLUXERR_AUTO", "FWHM_IMAGE", "FLAGS", "BACKGROUND", "ELLIPTICITY"]


def run_sextractor(image: Path, workdir: Path, gain: float, extra: list[str] | None = None) -> Table:
    """Source Extractor on ``image`` with a minimal configuration; returns the catalogue.

    ``GAIN_KEY`` points at a keyword that does not exist so that ``gain`` (e-/ADU) is used,
    not the camera's GAIN setting (v1 bug B12).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    param = workdir / "sim.param"
    param.write_text("\n".join(SEX_PARAMS) + "\n")
    cat = workdir / f"{image.stem}.cat"
    run_tool("sextractor", [str(image), "-c", "/dev/null", "-PARAMETERS_NAME", str(param),
                            "-CATALOG_NAME", str(cat), "-CATALOG_TYPE", "FITS_1.0", "-FILTER", "N",
                            "-DETECT_THRESH", "3", "-ANALYSIS_THRESH", "3", "-DETECT_MINAREA", "5",
                            "-GAIN", str(gain), "-GAIN_KEY", "NO_SUCH_KEY", "-SATUR_LEVEL", "60000",
                            "-SATUR_KEY", "NO_SUCH_KEY", "-BACK_SIZE", "128", "-PIXEL_SCALE", "0.505",
                            "-VERBOSE_TYPE", "QUIET", *(extra or [])], cwd=workdir, timeout=300)
    with fits.open(cat) as h:
        return Table(h[1].data)


def match_nearest(x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (x1, y1), the index of the nearest (x2, y2) and its distance."""
    from scipy.spatial import cKDTree

    d, i = cKDTree(np.c_[x2, y2]).query(np.c_[x1, y1])
    return i, d


def moffat_fraction_within(r: np.ndarray | float, fwhm: np.ndarray | float, beta: float) -> np.ndarray:
    """Fraction of a circular Moffat's flux inside radius ``r`` (same units as ``fwhm``)."""
    alpha = np.asarray(fwhm) / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return 1.0 - (1.0 + (np.asarray(r) / alpha) ** 2) ** (1.0 - beta)
