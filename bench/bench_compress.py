"""Benchmark of tile-compressed FITS products: write time, read time, size, and what lossy
compression does to the data; and whether the astromatic tools read such files.

    .venv/bin/python -m bench.bench_compress [--size 1536x1024 | --full] [--repeat 3]
                                             [--workdir DIR] [--json result.json]

Harness stage ``compress`` (``python -m bench.run --only compress``): ``run_compress(size,
repeat, workdir, opts)`` returns the result shape of :mod:`bench.stages`.

Data (synthetic, made once and cached under ``workdir/compress``):

* a reduced single frame of ``size`` (9576 x 6388 at full size) as the calibration stage writes
  it: float32 image (sky 300 ADU, EGAIN 0.256 e-/ADU, read noise 3 e-, flat with vignetting and
  0.5 % pixel response, ~66,000 Gaussian stars of FWHM 4.5 px per full frame with a power-law
  flux distribution and saturated cores, hot pixels, bad columns, cosmic rays, one satellite
  trail), float32 inverse-variance weight (background noise model, 0 where masked) and int16 bit
  mask (:class:`gppy.masks.MaskBit` bits);
* a stack on the grid that goes with ``size`` (10200 x 6800 at full size): float32,
  background-subtracted, noise of three frames, the same star density, zero outside the
  footprint (as SWarp writes it).

For each product, ``--repeat`` times, alternating: write and read of

* plain FITS, as the pipeline writes now (:func:`gppy.fitsio.write_fits`, ``write_mask``; read
  with :func:`gppy.fitsio.read_image`);
* ``RICE_1`` lossless for the int16 mask;
* ``RICE_1`` with ``quantize_level`` 16 and ``SUBTRACTIVE_DITHER_2`` (lossy; exact zeros kept;
  the dither seed from the data's checksum, so the same data give the same file) for the float
  image, weight and stack;
* ``GZIP_2`` lossless (no quantisation) for the float products.

Compressed files are written as fpack does (an empty primary HDU and a ``CompImageHDU`` in
extension 1, tiles of one row) with astropy's ``CompImageHDU`` (single-threaded), atomically
like every product. Writes go to the page cache (no fsync), as in the other stages.

Checked on the last repeat's files: lossless round trips are bit-exact; the noise that lossy
compression adds (rms of decompressed - original, over unmasked/covered pixels) relative to the
sky noise (1.4826 x MAD of the original's background); the change in aperture flux (radius
2 FWHM) of the 20 brightest unsaturated stars, in units of their flux error and of their flux;
the weight's relative error and whether its zeros (masked pixels) stay zero.

Tools: Source Extractor and SWarp run once each on small (at most 1024 x 1024) cut-outs:
Source Extractor on a RICE_1 image and on a plain image with a RICE_1 FLAG_IMAGE; SWarp on a
RICE_1 (q16) image with a RICE_1 weight map, and on GZIP_2 ones, compared with SWarp on plain
files that hold the same (decompressed) pixels.

Measured on this machine (2 cores, 1-min load 0.8-1.1, 2026-11-25, commit 08fdbfe),
``python -m bench.run --size full --only compress --repeat 3 --merge`` (2.6 min), medians:

* reduced frame (image + weight + mask, 612 MB plain): write 0.60 s plain; RICE_1 q16 / q16 /
  RICE_1 lossless 6.97 s (7.0 CPU s), 107 MB (5.7x smaller), read 2.16 s vs 0.50 s; GZIP_2 /
  GZIP_2 / RICE_1 10.9 s, 335 MB (1.8x), read 4.6 s. Per product: image RICE_1 q16 3.42 s write,
  1.05 s read, 4.65x; GZIP_2 4.75 s / 2.23 s / 1.37x; weight RICE_1 q16 3.37 / 1.01 s / 4.63x,
  GZIP_2 5.97 / 2.25 s / 1.58x; mask RICE_1 0.17 s write (plain 0.23 s), 0.10 s read, 101x.
* stack 10200 x 6800 (277 MB): plain 0.19 s; RICE_1 q16 3.71 s, read 1.21 s, 5.2x; GZIP_2 10.2 s,
  read 2.8 s, 1.25x.
* RICE_1 q16 adds 1.79 % of the sky noise (frame and stack; +0.016 % in quadrature), no mean
  offset (3e-5 ADU); the 20 brightest unsaturated stars' aperture fluxes change by at most
  0.028 sigma (frame) / 0.033 sigma (stack), 2.6e-5 of the flux; the weight's relative error is
  1e-4 rms, its zeros and the stack's empty area stay exactly zero; GZIP_2 and RICE_1 on ints
  are bit-exact.
* Source Extractor 2.25 does not read tile-compressed files ("*Error*: Unknown TFORM in
  img_rice.fits", exit 1; also as FLAG_IMAGE); SWarp 2.41.5 does (RICE_1 q16 and GZIP_2, image
  and weight), with output identical to a run on plain files holding the same pixels.

Hence: products that Source Extractor reads during the night (reduced image, weight and mask
in astrometry and photometry; stacks; differences) stay plain; compression (RICE_1 q16 with
SUBTRACTIVE_DITHER_2 for float images and weights, RICE_1 lossless for masks; GZIP_2 is not
worth its cost) belongs to the archive of end-of-night products, run off the critical path.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.hdu.compressed import DITHER_SEED_CHECKSUM, SUBTRACTIVE_DITHER_2

REPO = Path(__file__).resolve().parents[1]
FULL = (9576, 6388)

SKY_ADU = 300.0
EGAIN = 0.256                 # e- / ADU
READ_NOISE_ADU = 3.0 / EGAIN  # 3 e- rms
SATURATE = 60000.0
FWHM_PX = 4.5
STARS_PER_PX = 66405 / (FULL[0] * FULL[1])   # the simulator's star count on a full frame
STACK_FRAMES = 3

#: codec name -> CompImageHDU options (``None``: plain FITS)
CODECS: dict[str, dict | None] = {
    "plain": None,
    "RICE_1": {"compression_type": "RICE_1"},
    "RICE_1 q16": {"compression_type": "RICE_1", "quantize_level": 16.0,
                   "quantize_method": SUBTRACTIVE_DITHER_2, "dither_seed": DITHER_SEED_CHECKSUM},
    "GZIP_2": {"compression_type": "GZIP_2", "quantize_level": 0.0},
}

#: product -> (description, codecs measured)
PRODUCTS: dict[str, tuple[str, list[str]]] = {
    "image": ("reduced frame image, float32", ["plain", "RICE_1 q16", "GZIP_2"]),
    "weight": ("reduced frame weight (inverse variance), float32", ["plain", "RICE_1 q16", "GZIP_2"]),
    "mask": ("reduced frame bit mask, int16", ["plain", "RICE_1"]),
    "stack": ("stack image, float32", ["plain", "RICE_1 q16", "GZIP_2"]),
}

CODEC_LABEL = {
    "plain": "plain FITS (as written now)",
    "RICE_1": "RICE_1 lossless",
    "RICE_1 q16": "RICE_1 quantize_level 16, SUBTRACTIVE_DITHER_2 (lossy)",
    "GZIP_2": "GZIP_2 lossless",
}


# ------------------------------------------------------------------------------------ data

def _wcs_header(nx: int, ny: int, ra: float = 150.0, dec: float = 2.0) -> fits.Header:
    h = fits.Header()
    scale = 0.505 / 3600.0
    for k, v in (("CTYPE1", "RA---TAN"), ("CTYPE2", "DEC--TAN"), ("CRVAL1", ra), ("CRVAL2", dec),
                 ("CRPIX1", nx / 2 + 0.5), ("CRPIX2", ny / 2 + 0.5), ("CD1_1", -scale), ("CD1_2", 0.0),
                 ("CD2_1", 0.0), ("CD2_2", scale), ("RADESYS", "ICRS"), ("EQUINOX", 2000.0)):
        h[k] = v
    return h


def _frame_header(nx: int, ny: int) -> fits.Header:
    h = _wcs_header(nx, ny)
    for k, v in (("OBJECT", "T00001"), ("FILTER", "m625"), ("EXPTIME", 100.0), ("GAIN", 2750),
                 ("EGAIN", EGAIN), ("RDNOISE", READ_NOISE_ADU * EGAIN), ("SATURATE", SATURATE),
                 ("SKYVAL", SKY_ADU), ("SEEING", FWHM_PX * 0.505), ("DATE-OBS", "2025-01-15T03:00:00.000"),
                 ("TELESCOP", "7DT01"), ("INSTRUME", "C3-61000 PRO"), ("BUNIT", "ADU")):
        h[k] = v
    return h


def _stars(rng: np.random.Generator, nx: int, ny: int, margin: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (x, y, 0-based) and total fluxes (ADU) of a power-law star field,
    N(>F) ~ F^-0.75 from 150 ADU up."""
    n = int(round(STARS_PER_PX * nx * ny))
    x = rng.uniform(margin, nx - margin, n)
    y = rng.uniform(margin, ny - margin, n)
    flux = 150.0 * rng.uniform(1e-5, 1.0, n) ** (-1.0 / 0.75)
    return x, y, np.minimum(flux, 5e7)


def _render(img: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> None:
    """Add Gaussian stars (FWHM ``FWHM_PX``) to ``img`` in place."""
    sig = FWHM_PX / 2.3548
    ny, nx = img.shape
    for xi, yi, fi in zip(x, y, flux, strict=True):
        half = 8 if fi < 1e5 else 14
        x0, x1 = max(0, int(xi) - half), min(nx, int(xi) + half + 1)
        y0, y1 = max(0, int(yi) - half), min(ny, int(yi) + half + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.exp(-0.5 * ((np.arange(x0, x1) - xi) / sig) ** 2)
        gy = np.exp(-0.5 * ((np.arange(y0, y1) - yi) / sig) ** 2)
        img[y0:y1, x0:x1] += (fi / (2 * np.pi * sig * sig)) * np.outer(gy, gx).astype(np.float32)


def _bright_test_stars(x, y, flux, peak_limit: float, nx: int, ny: int, n: int = 20) -> list[list[float]]:
    """The ``n`` brightest stars whose peak stays below ``peak_limit`` ADU, away from edges."""
    sig = FWHM_PX / 2.3548
    peak = flux / (2 * np.pi * sig * sig)
    r = 3 * FWHM_PX
    ok = (peak < peak_limit) & (x > r) & (x < nx - r) & (y > r) & (y < ny - r)
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(flux[idx])[::-1][:n]]
    return [[float(x[i]), float(y[i]), float(flux[i])] for i in idx]


def make_frame(size: tuple[int, int], seed: int = 1) -> dict:
    """A reduced single frame: float32 image, float32 inverse-variance weight, int16 mask;
    with the header and the test stars (x, y, flux)."""
    from gppy.masks import MaskBit

    nx, ny = size
    rng = np.random.default_rng(seed)
    # flat: vignetting (8 % at the corners) and 0.5 % pixel response non-uniformity
    yy = ((np.arange(ny, dtype=np.float32) - ny / 2) / (ny / 2)) ** 2
    xx = ((np.arange(nx, dtype=np.float32) - nx / 2) / (nx / 2)) ** 2
    flat = (1.0 - 0.04 * (yy[:, None] + xx[None, :])).astype(np.float32)
    flat *= 1.0 + 0.005 * rng.standard_normal((ny, nx), dtype=np.float32)
    x, y, flux = _stars(rng, nx, ny)
    signal = np.zeros((ny, nx), np.float32)
    _render(signal, x, y, flux)
    # raw-domain variance (ADU^2) of sky + sources, back in the reduced frame: / flat^2
    var_bg = (SKY_ADU * flat / EGAIN + READ_NOISE_ADU ** 2) / (flat * flat)
    noise = rng.standard_normal((ny, nx), dtype=np.float32)
    noise *= np.sqrt(var_bg + signal / (EGAIN * flat))
    image = signal
    image += SKY_ADU
    image += noise
    del noise
    mask = np.zeros((ny, nx), np.int16)
    # saturated cores
    sat = image * flat >= SATURATE
    image[sat] = SATURATE / flat[sat]
    mask[sat] |= int(MaskBit.SATURATED)
    # hot pixels and bad columns
    nhot = max(1, int(2e-4 * nx * ny))
    hy, hx = rng.integers(0, ny, nhot), rng.integers(0, nx, nhot)
    image[hy, hx] += rng.uniform(500, 20000, nhot).astype(np.float32)
    mask[hy, hx] |= int(MaskBit.BAD)
    for c in rng.integers(0, nx, 3):
        image[:, c] += 80.0
        mask[:, c] |= int(MaskBit.BAD)
    # cosmic rays: small clumps
    ncr = max(1, int(300 * nx * ny / (FULL[0] * FULL[1])))
    for _ in range(ncr):
        cy, cx = int(rng.integers(2, ny - 3)), int(rng.integers(2, nx - 3))
        h, w = int(rng.integers(1, 3)), int(rng.integers(1, 4))
        image[cy:cy + h, cx:cx + w] += float(rng.uniform(300, 5000))
        mask[cy:cy + h, cx:cx + w] |= int(MaskBit.COSMIC_RAY)
    # one satellite trail (6 px wide, +150 ADU)
    cols = np.arange(nx)
    rows = (0.2 * ny + 0.5 * ny * cols / nx).astype(int)
    for dy in range(-3, 3):
        r = np.clip(rows + dy, 0, ny - 1)
        image[r, cols] += 150.0
        mask[r, cols] |= int(MaskBit.TRAIL)
    weight = (1.0 / var_bg).astype(np.float32)
    weight[mask != 0] = 0.0
    del var_bg, flat
    stars = _bright_test_stars(x, y, flux, 0.6 * (SATURATE - SKY_ADU), nx, ny)
    return {"image": image, "weight": weight, "mask": mask, "header": _frame_header(nx, ny), "stars": stars}


def make_stack(grid: tuple[int, int], frame: tuple[int, int], seed: int = 2) -> dict:
    """A background-subtracted stack of ``STACK_FRAMES`` frames on ``grid``: zero outside the
    footprint, one- and two-frame coverage along its edges; with the test stars."""
    gx, gy = grid
    fx, fy = frame
    rng = np.random.default_rng(seed)
    sigma1 = math.sqrt(SKY_ADU / EGAIN + READ_NOISE_ADU ** 2)
    ox, oy = (gx - fx) // 2, (gy - fy) // 2
    dith = max(2, int(round(0.006 * fx)))          # ~60 px dithers at full size
    cover = np.zeros((gy, gx), np.float32)
    for k in range(STACK_FRAMES):
        dx, dy = (k - 1) * dith, (1 - k) * dith // 2
        cover[oy + dy:oy + dy + fy, ox + dx:ox + dx + fx] += 1.0
    x, y, flux = _stars(rng, gx, gy)
    stack = np.zeros((gy, gx), np.float32)
    _render(stack, x, y, flux)
    noise = rng.standard_normal((gy, gx), dtype=np.float32)
    covered = cover > 0
    with np.errstate(divide="ignore"):
        noise *= np.sqrt((sigma1 ** 2 + stack / EGAIN) / np.maximum(cover, 1.0))
    stack += noise
    del noise
    stack[~covered] = 0.0
    inside = (x > ox + dith + 3 * FWHM_PX) & (x < ox + fx - dith - 3 * FWHM_PX) & \
             (y > oy + dith + 3 * FWHM_PX) & (y < oy + fy - dith - 3 * FWHM_PX)
    stars = _bright_test_stars(x[inside], y[inside], flux[inside], 0.6 * SATURATE, gx, gy)
    hdr = _wcs_header(gx, gy)
    for k, v in (("OBJECT", "T00001"), ("FILTER", "m625"), ("EXPTIME", 300.0), ("NCOMBINE", STACK_FRAMES),
                 ("BUNIT", "ADU")):
        hdr[k] = v
    return {"image": stack, "header": hdr, "stars": stars, "noise_adu": sigma1 / math.sqrt(STACK_FRAMES)}


# ------------------------------------------------------------------------------------ I/O

def write_product(dest: Path, data: np.ndarray, header: fits.Header, codec: str) -> Path:
    """Write ``data`` as plain FITS (the pipeline's writers) or tile-compressed (empty primary
    HDU + ``CompImageHDU``), atomically."""
    from gppy.fitsio import atomic_path, write_fits, write_mask

    opts = CODECS[codec]
    if opts is None:
        if data.dtype == np.int16:
            return write_mask(dest, data, header)
        return write_fits(dest, data, header)
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header, **opts)])
    with atomic_path(dest) as tmp:
        hdul.writeto(tmp, overwrite=True, output_verify="silentfix")
    return Path(dest)


def read_product(path: Path, codec: str, dtype) -> np.ndarray:
    """Read the image back (plain: :func:`gppy.fitsio.read_image`; compressed: extension 1,
    decompressed whole)."""
    from gppy.fitsio import read_image

    if CODECS[codec] is None:
        return read_image(path, dtype=dtype)[0]
    with fits.open(path, memmap=False) as hdul:
        return np.asarray(hdul[1].data, dtype=dtype)


# ------------------------------------------------------------------------------------ quality

def _robust_sigma(values: np.ndarray) -> float:
    v = values[:: max(1, values.size // 4_000_000)]
    med = np.median(v)
    return float(1.4826 * np.median(np.abs(v - med)))


def aperture_changes(orig: np.ndarray, new: np.ndarray, var: np.ndarray | float, stars: list) -> dict:
    """Change of the aperture sum (radius 2 FWHM) of each test star: in units of the flux error
    (sqrt of the summed variance) and as a fraction of the flux (aperture sum minus the local
    sky, the median of an annulus 3-5 FWHM)."""
    r, r1, r2 = 2 * FWHM_PX, 3 * FWHM_PX, 5 * FWHM_PX
    ny, nx = orig.shape
    in_sigma, in_flux = [], []
    for x, y, _f in stars:
        x0, x1 = max(0, int(x - r2)), min(nx, int(x + r2) + 2)
        y0, y1 = max(0, int(y - r2)), min(ny, int(y + r2) + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        ap = d2 <= r * r
        ann = (d2 >= r1 * r1) & (d2 <= r2 * r2)
        o = orig[y0:y1, x0:x1].astype(np.float64)
        n = new[y0:y1, x0:x1].astype(np.float64)
        v = var if np.isscalar(var) else var[y0:y1, x0:x1][ap].astype(np.float64)
        err = math.sqrt(float(np.sum(v)) if not np.isscalar(v) else v * ap.sum())
        flux = float(np.sum(o[ap]) - np.median(o[ann]) * ap.sum())
        delta = float(np.sum(n[ap]) - np.sum(o[ap]))
        in_sigma.append(delta / err)
        in_flux.append(delta / flux)
    a, b = np.abs(in_sigma), np.abs(in_flux)
    return {"stars": len(stars), "max_abs_dflux_over_sigma": float(a.max()), "rms_dflux_over_sigma":
            float(np.sqrt(np.mean(np.square(in_sigma)))), "max_abs_dflux_over_flux": float(b.max()),
            "median_flux_adu": float(np.median([s[2] for s in stars]))}


def lossy_quality(orig: np.ndarray, new: np.ndarray, good: np.ndarray, sky_sigma: float) -> dict:
    d = (new[good].astype(np.float64) - orig[good])
    added = float(np.sqrt(np.mean(d * d)))
    return {"added_noise_rms_adu": added, "sky_noise_adu": sky_sigma, "added_over_sky": added / sky_sigma,
            "noise_increase_in_quadrature": math.sqrt(1 + (added / sky_sigma) ** 2) - 1,
            "mean_offset_adu": float(d.mean()), "max_abs_error_over_sky": float(np.abs(d).max() / sky_sigma)}


# ------------------------------------------------------------------------------------ tools

def _tool_error(exc: Exception, folder: Path) -> str:
    """The tool's error line, without terminal codes and with file names relative to ``folder``."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).replace(str(folder) + "/", "")
    lines = [ln.strip().lstrip("> ").strip() for ln in text.replace("\r", "\n").splitlines()]
    err = [ln for ln in lines if "error" in ln.lower()]
    return (err[-1] if err else (lines[-1] if lines else text))[:300]


def tools_read_compressed(frame: dict, folder: Path) -> dict:
    """Run Source Extractor and SWarp once each on small tile-compressed files."""
    from gppy import tools

    folder.mkdir(parents=True, exist_ok=True)
    ny, nx = frame["image"].shape
    cx, cy = min(nx, 1024), min(ny, 1024)
    x0, y0 = (nx - cx) // 2, (ny - cy) // 2
    cut = {k: np.ascontiguousarray(frame[k][y0:y0 + cy, x0:x0 + cx]) for k in ("image", "weight", "mask")}
    hdr = frame["header"].copy()
    hdr["CRPIX1"] -= x0
    hdr["CRPIX2"] -= y0
    out: dict = {"cutout": f"{cx}x{cy}"}

    # --- Source Extractor
    params = folder / "cat.param"
    params.write_text("NUMBER\nX_IMAGE\nY_IMAGE\nFLUX_AUTO\n")
    params_flag = folder / "cat_flag.param"
    params_flag.write_text("NUMBER\nX_IMAGE\nY_IMAGE\nFLUX_AUTO\nIMAFLAGS_ISO\n")
    plain = write_product(folder / "img_plain.fits", cut["image"], hdr, "plain")
    rice = write_product(folder / "img_rice.fits", cut["image"], hdr, "RICE_1 q16")
    mask_rice = write_product(folder / "mask_rice.fits", cut["mask"], hdr, "RICE_1")

    def sex(image: Path, name: str, flag: Path | None = None) -> dict:
        cat = folder / f"{name}.cat"
        args = [image, "-PARAMETERS_NAME", params if flag is None else params_flag, "-CATALOG_NAME", cat, "-CATALOG_TYPE", "ASCII_HEAD",
                "-FILTER", "N", "-DETECT_THRESH", "5", "-VERBOSE_TYPE", "QUIET", "-NTHREADS", "1"]
        if flag is not None:
            args += ["-FLAG_IMAGE", flag]
        try:
            tools.run_tool("sextractor", args, cwd=folder, timeout=120)
        except tools.ToolError as exc:
            return {"reads": False, "error": _tool_error(exc, folder)}
        rows = [ln for ln in cat.read_text().splitlines() if ln and not ln.startswith("#")]
        return {"reads": True, "detections": len(rows)}

    if tools.which("sextractor"):
        out["sextractor plain image (baseline)"] = sex(plain, "plain")
        out["sextractor RICE_1 q16 image"] = sex(rice, "rice")
        out["sextractor plain image + RICE_1 FLAG_IMAGE"] = sex(plain, "flag", mask_rice)
    else:
        out["sextractor"] = "not present"

    # --- SWarp: compressed image + weight vs plain files holding the same pixels
    def swarp(image: Path, weight: Path, name: str) -> tuple[dict, np.ndarray | None]:
        d = folder / f"swarp_{name}"
        d.mkdir(exist_ok=True)
        args = [image, "-IMAGEOUT_NAME", d / "coadd.fits", "-WEIGHTOUT_NAME", d / "coadd.weight.fits",
                "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_IMAGE", weight, "-RESAMPLE", "Y", "-RESAMPLE_DIR", d,
                "-VMEM_DIR", d, "-SUBTRACT_BACK", "N", "-COMBINE", "Y", "-WRITE_XML", "N", "-NTHREADS", "1",
                "-VERBOSE_TYPE", "QUIET"]
        try:
            tools.run_tool("swarp", args, cwd=d, timeout=120)
        except tools.ToolError as exc:
            return {"reads": False, "error": _tool_error(exc, d)}, None
        return {"reads": True}, fits.getdata(d / "coadd.fits").astype(np.float32)

    if tools.which("swarp"):
        for codec in ("RICE_1 q16", "GZIP_2"):
            tag = codec.split()[0] + ("q16" if "q16" in codec else "")
            ci = write_product(folder / f"sw_img_{tag}.fits", cut["image"], hdr, codec)
            cw = write_product(folder / f"sw_wgt_{tag}.fits", cut["weight"], hdr, codec)
            pi = write_product(folder / f"sw_img_{tag}_plain.fits", read_product(ci, codec, np.float32), hdr, "plain")
            pw = write_product(folder / f"sw_wgt_{tag}_plain.fits", read_product(cw, codec, np.float32), hdr,
                               "plain")
            res, a = swarp(ci, cw, tag)
            _, b = swarp(pi, pw, tag + "_plain")
            if a is not None and b is not None:
                res["max_abs_diff_vs_plain_run_adu"] = float(np.nanmax(np.abs(a - b)))
            out[f"swarp {codec} image + weight"] = res
    else:
        out["swarp"] = "not present"
    return out


# ------------------------------------------------------------------------------------ harness

def _name(product: str, desc: str, shape: tuple[int, int], codec: str, op: str) -> str:
    return f"{op} {desc} {shape[1]}x{shape[0]}: {CODEC_LABEL[codec]}"


def run_compress(size, repeat, workdir: Path, opts: dict) -> dict:
    """Harness entry (result shape of :mod:`bench.stages`)."""
    from bench.measure import Series, timed
    from bench.stages import cached, grid_for, target

    size = tuple(int(v) for v in size)
    workdir = Path(workdir)
    grid = grid_for(size)

    def make(folder: Path) -> dict:
        fr = make_frame(size)
        for k in ("image", "weight", "mask"):
            write_product(folder / f"frame.{k}.fits", fr[k], fr["header"], "plain")
        st = make_stack(grid, size)
        write_product(folder / "stack.fits", st["image"], st["header"], "plain")
        return {"frame_stars": fr["stars"], "stack_stars": st["stars"], "stack_noise_adu": st["noise_adu"]}

    folder = workdir / "compress"
    meta, gen_s = cached(folder, {"size": list(size), "grid": list(grid), "v": 1}, make)
    if opts.get("generate_only"):
        return {"generated_s": gen_s}
    from gppy.fitsio import read_image

    src = {"image": folder / "frame.image.fits", "weight": folder / "frame.weight.fits",
           "mask": folder / "frame.mask.fits", "stack": folder / "stack.fits"}
    data, headers = {}, {}
    for k, p in src.items():
        data[k], headers[k] = read_image(p, dtype=np.int16 if k == "mask" else np.float32)
    out = workdir / "compress-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    series: dict[tuple[str, str, str], Series] = {}
    for prod, (desc, codecs) in PRODUCTS.items():
        for codec in codecs:
            kind = "ours" if codec == "plain" else "info"
            for op in ("write", "read"):
                series[prod, codec, op] = Series(_name(prod, desc, data[prod].shape, codec, op), kind)
    sizes: dict[tuple[str, str], int] = {}
    back: dict[tuple[str, str], np.ndarray] = {}
    exact: dict[str, bool] = {}
    for rep in range(max(1, repeat)):
        for prod, (_desc, codecs) in PRODUCTS.items():
            dtype = data[prod].dtype
            for codec in codecs:
                path = out / f"{prod}.{codec.replace(' ', '_')}.fits"
                run, _ = timed(lambda p=path, d=data[prod], h=headers[prod], c=codec: write_product(p, d, h, c))
                series[prod, codec, "write"].add(run)
                run, arr = timed(lambda p=path, c=codec, t=dtype: read_product(p, c, t))
                series[prod, codec, "read"].add(run)
                sizes[prod, codec] = path.stat().st_size
                if rep == max(1, repeat) - 1 and codec != "plain":
                    if "q16" in codec:
                        back[prod, codec] = arr          # lossy: kept for the quality figures
                    else:
                        exact[f"{prod} {codec}"] = bool(np.array_equal(arr, data[prod]))
                del arr

    # --- lossy quality
    img, wgt, msk = data["image"], data["weight"], data["mask"]
    good = (msk == 0) & (wgt > 0)
    sky_sigma = _robust_sigma(img[good][::7])
    var = np.zeros_like(wgt)
    np.divide(1.0, wgt, out=var, where=wgt > 0)
    q_img = lossy_quality(img, back["image", "RICE_1 q16"], good, sky_sigma)
    q_img["aperture"] = aperture_changes(img, back["image", "RICE_1 q16"], var, meta["frame_stars"])
    del var
    stk = data["stack"]
    covered = stk != 0
    st_sigma = _robust_sigma(stk[covered][::7])
    q_stk = lossy_quality(stk, back["stack", "RICE_1 q16"], covered, st_sigma)
    q_stk["aperture"] = aperture_changes(stk, back["stack", "RICE_1 q16"], float(meta["stack_noise_adu"]) ** 2,
                                         meta["stack_stars"])
    q_stk["zeros_outside_footprint_kept"] = bool(np.all(back["stack", "RICE_1 q16"][~covered] == 0))
    w2 = back["weight", "RICE_1 q16"]
    pos = wgt > 0
    rel = (w2[pos].astype(np.float64) - wgt[pos]) / wgt[pos]
    q_wgt = {"rms_relative_error": float(np.sqrt(np.mean(rel * rel))), "max_abs_relative_error":
             float(np.abs(rel).max()), "zeros_kept": bool(np.all(w2[~pos] == 0)),
             "no_new_zeros_or_negatives": bool(np.all(w2[pos] > 0))}
    del rel, w2, back

    tool_check = tools_read_compressed({"image": img, "weight": wgt, "mask": msk, "header": headers["image"]},
                                       out / "tools")
    shutil.rmtree(out, ignore_errors=True)

    summ = {k: s.summary() for k, s in series.items()}

    def med(p, c, op):
        return summ[p, c, op]["median_s"]

    def ratio(p, c):
        return sizes[p, "plain"] / sizes[p, c]

    frame_sets = {
        "plain (now)": {"image": "plain", "weight": "plain", "mask": "plain"},
        "lossy: RICE_1 q16 image + weight, RICE_1 mask": {"image": "RICE_1 q16", "weight": "RICE_1 q16",
                                                         "mask": "RICE_1"},
        "lossless: GZIP_2 image + weight, RICE_1 mask": {"image": "GZIP_2", "weight": "GZIP_2", "mask": "RICE_1"},
    }
    frame_tot = {}
    for label, choice in frame_sets.items():
        frame_tot[label] = {
            "write_s": sum(med(p, c, "write") for p, c in choice.items()),
            "read_s": sum(med(p, c, "read") for p, c in choice.items()),
            "write_cpu_s": sum(summ[p, c, "write"]["cpu_median_s"] or 0.0 for p, c in choice.items()),
            "mb": sum(sizes[p, c] for p, c in choice.items()) / 1e6}
    plain_mb = frame_tot["plain (now)"]["mb"]
    for v in frame_tot.values():
        v["size_ratio"] = plain_mb / v["mb"]
        for k in ("write_s", "read_s", "write_cpu_s", "mb", "size_ratio"):
            v[k] = round(v[k], 3)

    ratios = {}
    for p, (_d, codecs) in PRODUCTS.items():
        for c in codecs:
            if c != "plain":
                ratios[f"file size plain / {c}, {p}"] = ratio(p, c)
    ratios["write time lossy set / plain, reduced frame (3 files)"] = (
        frame_tot["lossy: RICE_1 q16 image + weight, RICE_1 mask"]["write_s"] / frame_tot["plain (now)"]["write_s"])
    ratios["write time lossless set / plain, reduced frame (3 files)"] = (
        frame_tot["lossless: GZIP_2 image + weight, RICE_1 mask"]["write_s"] / frame_tot["plain (now)"]["write_s"])

    lossy = frame_tot["lossy: RICE_1 q16 image + weight, RICE_1 mask"]
    lossless = frame_tot["lossless: GZIP_2 image + weight, RICE_1 mask"]
    plain = frame_tot["plain (now)"]
    sx = tool_check.get("sextractor RICE_1 q16 image", {})
    sw = tool_check.get("swarp RICE_1 q16 image + weight", {})

    def yesno(r: dict) -> str:
        if not isinstance(r, dict) or "reads" not in r:
            return "not present"
        return "yes" if r["reads"] else f"no ({r.get('error', '')})"

    ap_img, ap_stk = q_img["aperture"], q_stk["aperture"]
    targets = [
        target(f"reduced frame {size[0]}x{size[1]} (image + weight + mask): write, lossy set "
               f"(RICE_1 q16 / q16 / lossless)", "cost measured (no target)",
               f"{lossy['write_s']:.2f} s vs {plain['write_s']:.2f} s plain; read {lossy['read_s']:.2f} s vs "
               f"{plain['read_s']:.2f} s; {lossy['size_ratio']:.1f}x smaller", None),
        target("reduced frame: write, lossless set (GZIP_2 / GZIP_2 / RICE_1)", "cost measured (no target)",
               f"{lossless['write_s']:.2f} s; read {lossless['read_s']:.2f} s; {lossless['size_ratio']:.2f}x smaller",
               None),
        target(f"stack {grid[0]}x{grid[1]}: write RICE_1 q16 / GZIP_2", "cost measured (no target)",
               f"{med('stack', 'RICE_1 q16', 'write'):.2f} / {med('stack', 'GZIP_2', 'write'):.2f} s vs "
               f"{med('stack', 'plain', 'write'):.2f} s plain; {ratio('stack', 'RICE_1 q16'):.1f}x / "
               f"{ratio('stack', 'GZIP_2'):.2f}x smaller", None),
        target("RICE_1 q16: noise added to the frame and the stack, relative to the sky noise",
               "<= 2 % (1/(16 sqrt 12) = 1.8 % expected)",
               f"{100 * q_img['added_over_sky']:.2f} % / {100 * q_stk['added_over_sky']:.2f} %",
               q_img["added_over_sky"] <= 0.02 and q_stk["added_over_sky"] <= 0.02),
        target(f"RICE_1 q16: aperture flux change of the {ap_img['stars']} brightest unsaturated stars",
               "< 0.1 sigma_flux each",
               f"max {ap_img['max_abs_dflux_over_sigma']:.3f} / {ap_stk['max_abs_dflux_over_sigma']:.3f} sigma "
               f"(frame / stack); max {ap_img['max_abs_dflux_over_flux']:.1e} / "
               f"{ap_stk['max_abs_dflux_over_flux']:.1e} of the flux",
               ap_img["max_abs_dflux_over_sigma"] < 0.1 and ap_stk["max_abs_dflux_over_sigma"] < 0.1),
        target("lossless codecs round-trip bit-exact; lossy keeps weight zeros and the stack's empty area",
               "exact / kept", f"exact: {all(exact.values())}; weight zeros kept: {q_wgt['zeros_kept']}; "
               f"stack zeros kept: {q_stk['zeros_outside_footprint_kept']}",
               bool(exact) and all(exact.values()) and q_wgt["zeros_kept"] and q_wgt["no_new_zeros_or_negatives"]
               and q_stk["zeros_outside_footprint_kept"]),
        target("Source Extractor reads a tile-compressed image", "recorded", yesno(sx), None),
        target("SWarp reads a tile-compressed image + weight", "recorded",
               yesno(sw) + (f", output = plain run's to {sw['max_abs_diff_vs_plain_run_adu']:.1e} ADU"
                            if sw.get("max_abs_diff_vs_plain_run_adu") is not None else ""), None),
    ]
    ordered = [summ[k] for k in series]
    return {
        "series": ordered,
        "steps": {},
        "targets": targets,
        "ratios": ratios,
        "info": {
            "generate_s": gen_s,
            "file sizes (MB)": {f"{p} {c}": round(b / 1e6, 2) for (p, c), b in sizes.items()},
            "reduced frame, 3 files (seconds are sums of the medians)": frame_tot,
            "lossless round trip exact": exact,
            "RICE_1 q16 frame image": q_img,
            "RICE_1 q16 stack": q_stk,
            "RICE_1 q16 weight": q_wgt,
            "tools on tile-compressed files": tool_check,
        },
        "notes": [
            "Plain rows (ours) are the products as the pipeline writes them now; the compressed rows (info) "
            "are the options, written with astropy's CompImageHDU (one thread, tiles of one row, empty "
            "primary HDU + compressed extension as fpack writes), read back whole.",
            "Synthetic data: reduced frame with sky 300 ADU (noise ~36 ADU: EGAIN 0.256 e-/ADU, 3 e- read "
            "noise), ~66,000 stars per full frame, saturated cores, hot pixels, bad columns, cosmic rays, a "
            "trail; weight 1/variance of the background, 0 where masked; stack background-subtracted, noise "
            "of 3 frames, zero outside the footprint.",
            "Lossy quality: added noise = rms(decompressed - original) over unmasked (stack: covered) "
            "pixels; sky noise = 1.4826 MAD of the original; aperture r = 2 FWHM (9 px), flux error from "
            "the weight (stack: the noise level).",
            "Writes go to the page cache (no fsync); a disk at 1.3 GB/s adds ~0.19 s per plain float32 "
            "frame (performance-anchors.md), 1/ratio of that for a compressed one.",
        ],
    }


def _size(text: str) -> tuple[int, int]:
    if text.lower() == "full":
        return FULL
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1536x1024", help="WxH or full (9576x6388)")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="data cache and scratch (default: a temporary folder)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    size = FULL if a.full else _size(a.size)
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        wd = Path(a.workdir) if a.workdir else Path(tmp)
        t0 = time.perf_counter()
        r = run_compress(size, a.repeat, wd, {})
        r["wall_s"] = round(time.perf_counter() - t0, 1)
    for s in r["series"]:
        print(f"{s['name'][:100]:100s} {s['median_s']:7.3f} s")
    for t in r["targets"]:
        print(f"{t['what']}: {t['value']} [{t['target']}]")
    print(json.dumps(r["info"]["tools on tile-compressed files"], indent=1))
    print(f"wall {r['wall_s']} s")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
