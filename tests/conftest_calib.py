"""Helpers of the calibration tests: a synthetic detector with known truth, simulated nights
(gppy.sim) shared by the test files of a session, and the truth signal of a simulated frame."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from gppy.config import load_settings
from gppy_calib.headers import FrameInfo, describe
from gppy_calib.night import NightCalibrator

GAIN = 0.256          # e-/ADU
RN_E = 3.0            # e-
RN_ADU = RN_E / GAIN
RULES: list[tuple[str, str, str]] = []


# ------------------------------------------------------------------ synthetic detector
@dataclass
class Detector:
    bias: np.ndarray        # ADU
    dark: np.ndarray        # e-/s
    flat: np.ndarray        # response, median 1
    noisy: np.ndarray       # extra read noise (ADU) per pixel

    @property
    def shape(self) -> tuple[int, int]:
        return self.bias.shape


def make_detector(shape=(256, 384), seed=0, hot=(), dead_col=None, noisy_col=None) -> Detector:
    rng = np.random.default_rng(seed)
    ny, nx = shape
    bias = (500.0 + rng.normal(0, 2.0, nx)[None, :] + np.linspace(-1, 1, ny)[:, None]).astype(np.float32)
    bias = np.broadcast_to(bias, shape).copy()
    dark = np.full(shape, 0.01, np.float32)
    for (y, x, rate) in hot:
        dark[y, x] = rate
    yy, xx = np.mgrid[0:ny, 0:nx]
    rho2 = ((xx - nx / 2) ** 2 + (yy - ny / 2) ** 2) / ((nx / 2) ** 2 + (ny / 2) ** 2)
    flat = (1.0 - 0.1 * rho2) * (1 + rng.normal(0, 0.005, shape))
    ring = np.hypot(xx - nx * 0.3, yy - ny * 0.6)
    flat *= 1 - 0.03 * np.exp(-0.5 * ((ring - 15) / 3) ** 2)
    if dead_col is not None:
        flat[:, dead_col] *= 0.2
    flat = (flat / np.median(flat)).astype(np.float32)
    noisy = np.zeros(shape, np.float32)
    if noisy_col is not None:
        noisy[:, noisy_col] = 60.0
    return Detector(bias, dark, flat, noisy)


def expose(det: Detector, rng: np.random.Generator, exptime: float, signal_adu=None,
           offset: float = 0.0) -> np.ndarray:
    """A raw frame (float32 ADU, rounded and clipped like a 16-bit ADC)."""
    e = det.dark * exptime
    if signal_adu is not None:
        e = e + np.asarray(signal_adu) * det.flat * GAIN
    e = rng.poisson(np.maximum(e, 0)).astype(np.float64)
    adu = e / GAIN + det.bias + offset + rng.normal(0, RN_ADU, det.shape)
    adu += rng.normal(0, 1, det.shape) * det.noisy
    return np.clip(np.rint(adu), 0, 65535).astype(np.float32)


def header(kind: str, exptime: float, date_obs: str, filt: str = "r", obj: str = "T00001",
           shape=(256, 384)) -> fits.Header:
    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = shape[1]
    h["NAXIS2"] = shape[0]
    h["IMAGETYP"] = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field",
                     "science": "Light Frame"}[kind]
    h["EXPTIME"] = exptime
    h["DATE-OBS"] = date_obs
    h["FILTER"] = filt
    h["OBJECT"] = obj if kind == "science" else kind.upper()
    h["EGAIN"] = GAIN
    return h


def infos(kind: str, n: int, exptime: float, filt: str = "r", start_minute: int = 0,
          shape=(256, 384)) -> list[FrameInfo]:
    from gppy.tables import load_changehdr

    rules = load_changehdr()
    return [describe(f"/raw/{kind}_{i}.fits",
                     header(kind, exptime, f"2025-01-15T21:{start_minute + i:02d}:00", filt, shape=shape), rules)
            for i in range(n)]


def box_mean(a: np.ndarray, box: int) -> np.ndarray:
    ny, nx = (a.shape[0] // box) * box, (a.shape[1] // box) * box
    return a[:ny, :nx].reshape(ny // box, box, nx // box, box).mean(axis=(1, 3))


# ------------------------------------------------------------------ simulated nights
def sim_night(tmp_path_factory, key: str, **kw) -> Path:
    """Root of a simulated night (``gppy.sim.simulate``), made once per test session."""
    from gppy.sim import simulate

    base = tmp_path_factory.getbasetemp() / "calib-sims" / key
    done = base / ".done"
    if not done.exists():
        if base.exists():
            shutil.rmtree(base)
        simulate(base, **kw)
        done.write_text("ok")
    return base


def night_dir(root: Path) -> Path:
    return Path(json.loads((root / "truth" / "night.json").read_text())["night_dir"])


def write_config(tmp: Path, sim_root: Path, copy_archive: bool = False) -> Path:
    """A path.json reading the simulated raw data but writing products and masters under ``tmp``."""
    cfg = json.loads((sim_root / "path.json").read_text())
    cfg["path_processed"] = str(tmp / "processed")
    cfg["path_mframe"] = str(tmp / "mframe")
    cfg["path_scratch"] = str(tmp / "scratch")
    if copy_archive:
        src = sim_root / "factory" / "master_frame_1x1_gain2750"
        if src.exists():
            shutil.copytree(src, tmp / "mframe")
    path = tmp / "path.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def settings_for(config: Path, **overrides):
    return load_settings(config=str(config), gpu="off", **overrides)


def calibrator(config: Path, unit: str = "7DT01", **overrides) -> NightCalibrator:
    from gppy.xp import get_xp

    s = settings_for(config, **overrides)
    return NightCalibrator(s, s.paths(), unit, get_xp("off"))


def checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def frame_truth(sim_root: Path, raw_name: str) -> dict:
    return json.loads((sim_root / "truth" / "frames" / (raw_name[:-5] + ".json")).read_text())


def truth_mask(sim_root: Path, raw_name: str) -> np.ndarray:
    return fits.getdata(sim_root / "truth" / "frames" / (raw_name[:-5] + ".mask.fits"))


def truth_signal(sim_root: Path, raw_name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free calibrated signal of a simulated science frame (sky plane + stars + trail),
    rendered with the simulator's own renderer from the truth files, and a mask of pixels the
    truth does not describe exactly (frame border, transients)."""
    from gppy.sim.optics import PSFModel
    from gppy.sim.render import line_profile, render_moffat

    tj = frame_truth(sim_root, raw_name)
    ny, nx = shape
    yy = (np.arange(ny, dtype=np.float32)[:, None] - (ny - 1) / 2) / ny
    xx = (np.arange(nx, dtype=np.float32)[None, :] - (nx - 1) / 2) / nx
    gx, gy = tj["sky_gradient_per_frame"]
    sig = (tj["sky_adu"] * (1.0 + gx * xx + gy * yy)).astype(np.float32)
    p = tj["psf"]
    psf = PSFModel(p["fwhm_center_arcsec"], p["beta"], p["field_growth"], p["e0"], p["theta0_deg"], p["e_field"])
    stars = Table.read(sim_root / "truth" / "frames" / (raw_name[:-5] + ".stars.csv"))
    x, y = np.asarray(stars["x_0based"]), np.asarray(stars["y_0based"])
    fw, el, th = psf.at(x, y, (nx, ny))
    render_moffat(sig, x, y, np.asarray(stars["flux_adu"]), fw, psf.beta, el, th)
    if tj.get("trail"):
        t = tj["trail"]
        sig += line_profile((ny, nx), tuple(t["point0_0based"]), tuple(t["point1_0based"]),
                            t["fwhm_px"]) * t["peak_adu"]
    untrue = np.zeros(shape, bool)
    for tr in tj["transients"]:
        X, Y = int(round(tr["x_0based"])), int(round(tr["y_0based"]))
        untrue[max(0, Y - 15):Y + 16, max(0, X - 15):X + 16] = True
    b = 40       # stars just outside the frame are not in the truth table
    untrue[:b] = untrue[-b:] = True
    untrue[:, :b] = untrue[:, -b:] = True
    return sig, untrue
