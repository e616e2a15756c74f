"""Helpers of the phot tests: synthetic frames with known truth written as the pipeline does.

A frame is written as the astrometry stage leaves it: float32 image in ADU with a WCS,
EGAIN (e-/ADU) and GAIN = the camera setting (2750), SATURATE; ``<stem>.weight.fits``
(inverse background variance, 0 where masked) and ``<stem>.mask.fits`` (uint16 MaskBit);
the Gaia-XP-like catalogue goes to ``<path_refcat>/gaiaxp_dr3_synphot_<OBJ>.csv``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy.masks import MaskBit
from gppy.naming import calib_name
from gppy_phot import synthetic as syn


def moffat_ee(radius_px: float, fwhm_px: float, beta: float | None) -> float:
    """Encircled-energy fraction of the synthetic PSF within ``radius_px``."""
    if beta is None:
        sigma = fwhm_px / 2.3548200450309493
        return 1.0 - np.exp(-0.5 * radius_px**2 / sigma**2)
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return 1.0 - (1.0 + radius_px**2 / alpha**2) ** (1.0 - beta)


def pixel_ee(radius_px: float, fwhm_px: float, beta: float | None, npos: int = 6) -> float:
    """Encircled energy of the *rendered* (pixel-integrated) PSF in a circular aperture,
    computed as Source Extractor does it (pixels split at the aperture edge), averaged over
    sub-pixel positions."""
    rng = np.random.default_rng(0)
    h = int(np.ceil(radius_px)) + 2
    size = 2 * h + 41
    sub = 16
    fr = []
    for _ in range(npos):
        x0, y0 = size // 2 + rng.uniform(-0.5, 0.5, 2)
        img = syn.render_sources((size, size), np.array([x0]), np.array([y0]), np.array([1.0]), fwhm_px, beta,
                                 half=size // 2 - 1)
        off = (np.arange(sub) + 0.5) / sub - 0.5
        yy, xx = np.mgrid[0:size, 0:size]
        frac = np.zeros((size, size))
        for oy in off:
            for ox in off:
                frac += np.hypot(xx + ox - x0, yy + oy - y0) <= radius_px
        fr.append(float((img * frac / sub**2).sum() / img.sum()))
    return float(np.mean(fr))


def write_frame(folder: Path, fld: syn.SyntheticField, image: np.ndarray, *, unit: str = "7DT01",
                obj: str = "T00001", date_obs: str = "2024-04-23T03:28:04", exptime: float = 60.0,
                mask: np.ndarray | None = None, saturate: float = 60000.0, name: str | None = None,
                extra_header: dict | None = None, zero_weight: bool = True) -> tuple[Path, Path, Path]:
    """Write image, weight and mask; returns their paths. ``zero_weight=False`` keeps the weight
    of masked pixels (to see the mask reach Source Extractor as flags)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = name or calib_name(unit, obj, date_obs, fld.filt, exptime)
    path = folder / name
    h = syn.frame_header(fld, date_obs=date_obs, exptime=exptime, obj=obj, saturate=saturate)
    for k, v in (extra_header or {}).items():
        h[k] = v
    fits.writeto(path, image.astype(np.float32), h, overwrite=True)
    m = np.zeros(fld.shape, np.uint16) if mask is None else mask.astype(np.uint16)
    w = syn.weight_map(fld)
    if zero_weight:
        w[m != 0] = 0.0
    wpath = path.with_name(path.name[:-5] + ".weight.fits")
    mpath = path.with_name(path.name[:-5] + ".mask.fits")
    fits.writeto(wpath, w, overwrite=True)
    fits.writeto(mpath, m, overwrite=True)
    return path, wpath, mpath


def write_refcat(refcat_root: Path, fld: syn.SyntheticField, obj: str = "T00001", **kw) -> Path:
    """The field's Gaia-XP-like CSV under ``path_refcat``."""
    refcat_root.mkdir(parents=True, exist_ok=True)
    path = refcat_root / f"gaiaxp_dr3_synphot_{obj}.csv"
    syn.reference_table(fld, **kw).write(path, format="ascii.csv", overwrite=True)
    return path


def bad_box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """A mask with one rectangle (y0, y1, x0, x1) flagged BAD."""
    m = np.zeros(shape, np.uint16)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = int(MaskBit.BAD)
    return m


# ------------------------------------------------------------------ simulator frames
SIM_MASK_BITS = {1: MaskBit.COSMIC_RAY, 2: MaskBit.TRAIL, 4: MaskBit.SATURATED, 8: MaskBit.BAD, 16: MaskBit.BAD}


def calibrate_sim_frame(raw_path: Path, truth_dir: Path, out_dir: Path, saturate: float = 60000.0
                        ) -> tuple[Path, Path, Path, dict]:
    """A raw frame of :func:`gppy.sim.simulate` calibrated and solved with the simulator's own
    truth (true bias, dark current and flat; the true TPV WCS; the true mask), written as the
    astrometry stage leaves a frame (image, weight, mask). Returns the paths and the frame truth.

    The stages before photometry are being written in parallel; this gives the phot stage the
    frames they will give it, without depending on them.
    """
    import json

    from gppy.naming import calib_name

    raw_path = Path(raw_path)
    tstem = raw_path.name[:-5]
    truth = json.loads((truth_dir / "frames" / f"{tstem}.json").read_text())
    with fits.open(raw_path) as hdul:
        raw = hdul[0].data.astype(np.float64)
        head = hdul[0].header.copy()
    bias = fits.getdata(truth_dir / "calib" / "bias.fits").astype(np.float64)
    dark = fits.getdata(truth_dir / "calib" / "dark_current.fits").astype(np.float64)
    flat = fits.getdata(truth_dir / "calib" / f"flat_{head['FILTER']}.fits").astype(np.float64)
    gain = float(head["EGAIN"])
    t = float(head["EXPTIME"])
    cal = (raw - bias - truth["bias_offset_adu"] - dark * t / gain) / flat
    with fits.open(truth_dir / "frames" / f"{tstem}.mask.fits") as mh:
        tm = np.asarray(mh[1].data).astype(np.uint16)
    mask = np.zeros(cal.shape, np.uint16)
    for bit, mb in SIM_MASK_BITS.items():
        mask[(tm & bit) != 0] |= int(mb)
    sky = float(np.median(cal))
    rn = float(truth["read_noise_adu"])
    var = (np.clip(sky * flat, 0, None) / gain + rn**2) / flat**2
    weight = np.where(mask == 0, 1.0 / var, 0.0).astype(np.float32)
    wcs_head = fits.Header.fromstring(truth["wcs_header"], sep="\n")
    out = fits.Header()
    for key in ("OBJECT", "FILTER", "DATE-OBS", "EXPTIME", "EGAIN", "GAIN", "TELESCOP", "AIRMASS", "JD", "MJD"):
        if key in head:
            out[key] = head[key]
    out["SATURATE"] = (saturate, "[ADU] calibrated")
    out.update(wcs_head)
    unit = str(head["TELESCOP"]).strip()
    name = calib_name(unit, head["OBJECT"], head["DATE-OBS"], head["FILTER"], t)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fits.writeto(path, cal.astype(np.float32), out, overwrite=True)
    wpath = path.with_name(name[:-5] + ".weight.fits")
    mpath = path.with_name(name[:-5] + ".mask.fits")
    fits.writeto(wpath, weight, overwrite=True)
    fits.writeto(mpath, mask, overwrite=True)
    return path, wpath, mpath, truth
