"""Simulated image pairs for the subtraction tests (imported by tests/test_subtract_*.py).

A pair is a science image and a reference of the same sky: Moffat stars whose FWHM may vary
across the field, Gaussian noise from a background variance plus photon noise (EGAIN), a
differential background in the reference, saturated stars, masked pixels, variable stars and
transients (science only). Everything the tests check is computed from the truth kept here
(noise-free renderings), never from the engine's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gppy.masks import MaskBit


def moffat_alpha(fwhm: np.ndarray, beta: float) -> np.ndarray:
    return np.asarray(fwhm) / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def render(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm: np.ndarray,
           beta: float = 3.0, half: int = 22, oversample: int = 3, scale: float = 1.0) -> np.ndarray:
    """Noise-free image of point sources (Moffat, pixel-integrated by sub-sampling).

    Each source is normalised to ``flux`` over its (2*half+1)^2 cut-out, so the rendered flux
    is exactly ``flux`` for sources fully inside the image. ``scale`` multiplies the FWHM (for
    rendering on a grid of another pixel size the caller passes FWHM in that grid's pixels).
    """
    h, w = shape
    img = np.zeros((h + 2 * half + 2, w + 2 * half + 2), np.float64)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    off = np.arange(-half, half + 1)
    gx = (off[:, None] + sub[None, :]).ravel()  # (S*o,)
    ix = np.floor(x + 0.5).astype(int)
    iy = np.floor(y + 0.5).astype(int)
    fx = x - ix
    fy = y - iy
    alpha = moffat_alpha(np.asarray(fwhm) * scale, beta)
    n = len(x)
    size = 2 * half + 1
    for c0 in range(0, n, 64):
        sl = slice(c0, min(c0 + 64, n))
        dx = gx[None, :] - fx[sl, None]
        dy = gx[None, :] - fy[sl, None]
        a2 = (alpha[sl] ** 2)[:, None, None]
        prof = (1.0 + (dy[:, :, None] ** 2 + dx[:, None, :] ** 2) / a2) ** (-beta)
        prof = prof.reshape(-1, size, oversample, size, oversample).sum(axis=(2, 4))
        prof /= prof.sum(axis=(1, 2), keepdims=True)
        prof *= flux[sl, None, None]
        for k, i in enumerate(range(sl.start, sl.stop)):
            yy, xx = iy[i] + half + 1, ix[i] + half + 1
            if yy - half < 0 or xx - half < 0 or yy + half + 1 > img.shape[0] or xx + half + 1 > img.shape[1]:
                continue
            img[yy - half:yy + half + 1, xx - half:xx + half + 1] += prof[k]
    return img[half + 1:half + 1 + h, half + 1:half + 1 + w]


@dataclass
class SimImage:
    data: np.ndarray
    var: np.ndarray          # background variance (1 / weight)
    mask: np.ndarray         # uint16 MaskBit
    egain: float
    saturate: float
    truth: np.ndarray        # noise-free sources + background


@dataclass
class SimPair:
    sci: SimImage
    ref: SimImage
    x: np.ndarray            # star positions (science pixels)
    y: np.ndarray
    flux_sci: np.ndarray     # star fluxes in science ADU
    flux_ref: np.ndarray     # star fluxes in science ADU as seen in the reference epoch
    variable: np.ndarray     # bool
    tx: np.ndarray           # transient positions and fluxes (science ADU)
    ty: np.ndarray
    tflux: np.ndarray
    fwhm_sci: Callable
    fwhm_ref: Callable
    ref_scale: float         # reference units per science ADU
    info: dict = field(default_factory=dict)


def linear_fwhm(f0: float, gx: float = 0.0, gy: float = 0.0, shape=(1024, 1536)) -> Callable:
    """FWHM(x, y) = f0 * (1 + gx*(x/W - 0.5) + gy*(y/H - 0.5)) in science pixels."""
    h, w = shape
    return lambda x, y: f0 * (1.0 + gx * (np.asarray(x) / w - 0.5) + gy * (np.asarray(y) / h - 0.5))


def simulate_pair(seed: int = 1, shape=(1024, 1536), n_stars: int = 2600, sci_fwhm: Callable | None = None,
                  ref_fwhm: Callable | None = None, beta: float = 3.0, sky_sigma_sci: float = 8.0,
                  sky_sigma_ref: float = 2.5, egain_sci: float = 2.0, egain_ref: float = 12.0,
                  ref_scale: float = 0.5, ref_background=(35.0, 0.012, -0.008), n_transients: int = 14,
                  n_variables: int = 20, saturate_sci: float = 40000.0, saturate_ref: float = 30000.0,
                  ref_grid: dict | None = None) -> SimPair:
    """A science/reference pair with known truth.

    Parameters
    ----------
    sci_fwhm, ref_fwhm : callable (x, y) -> FWHM in science pixels
    ref_scale : float
        Reference units per science ADU (the kernel sum is 1/ref_scale when the reference is
        convolved).
    ref_background : (c, gx, gy)
        Reference background c + gx*x + gy*y (reference units) -- the differential background.
    ref_grid : dict, optional
        Render the reference on another grid: ``{"shape": (h, w), "to_ref": f(x, y) -> (xr, yr),
        "pix_ratio": reference pixel size / science pixel size}``. Default: the science grid.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    sci_fwhm = sci_fwhm or linear_fwhm(4.2, shape=shape)
    ref_fwhm = ref_fwhm or linear_fwhm(3.0, shape=shape)
    x = rng.uniform(-10, w + 10, n_stars)
    y = rng.uniform(-10, h + 10, n_stars)
    flux = 10 ** rng.uniform(2.0, 5.3, n_stars)
    flux_ref = flux.copy()
    variable = np.zeros(n_stars, bool)
    inside = np.nonzero((x > 40) & (x < w - 40) & (y > 40) & (y < h - 40) & (flux > 3000) & (flux < 60000))[0]
    var_idx = rng.choice(inside, size=n_variables, replace=False)
    variable[var_idx] = True
    fade = np.arange(n_variables) % 2 == 0
    flux_ref[var_idx[fade]] = flux[var_idx[fade]] * rng.uniform(2.0, 4.0, fade.sum())      # fading now
    flux_ref[var_idx[~fade]] = flux[var_idx[~fade]] * rng.uniform(0.25, 0.5, (~fade).sum())  # brightening now

    # transients: away from stars brighter than 0.3x their flux
    tflux = 10 ** rng.uniform(3.2, 4.3, n_transients)
    tx, ty = [], []
    for f in tflux:
        for _ in range(1000):
            cx, cy = rng.uniform(60, w - 60), rng.uniform(60, h - 60)
            d = np.hypot(x - cx, y - cy)
            if np.all((d > 18) | (flux < 0.05 * f)) and all(np.hypot(cx - a, cy - b) > 40 for a, b in zip(tx, ty, strict=False)):
                tx.append(cx)
                ty.append(cy)
                break
    tx, ty = np.array(tx), np.array(ty)

    # science (background-subtracted, ADU)
    truth_s = render(shape, np.r_[x, tx], np.r_[y, ty], np.r_[flux, tflux], sci_fwhm(np.r_[x, tx], np.r_[y, ty]),
                     beta)
    var_s = np.full(shape, sky_sigma_sci ** 2, np.float32)
    data_s = truth_s + rng.normal(0, 1, shape) * np.sqrt(var_s + np.maximum(truth_s, 0) / egain_sci)
    mask_s = np.zeros(shape, np.uint16)
    sat = data_s >= saturate_sci
    data_s = np.minimum(data_s, saturate_sci)
    mask_s[sat] |= int(MaskBit.SATURATED)
    col = int(w * 0.61)
    mask_s[:, col] |= int(MaskBit.BAD)
    data_s[:, col] = 3000.0
    for _ in range(25):  # masked cosmic rays
        cy, cx = rng.integers(20, h - 20), rng.integers(20, w - 20)
        data_s[cy:cy + 2, cx:cx + 2] += 5000.0
        mask_s[cy:cy + 2, cx:cx + 2] |= int(MaskBit.COSMIC_RAY)
    var_s = np.where(mask_s == 0, var_s, 0).astype(np.float32)

    # reference (units: ref_scale x science ADU, with a background plane)
    if ref_grid is None:
        rshape, xr, yr, pr = shape, x, y, 1.0
    else:
        rshape = ref_grid["shape"]
        xr, yr = ref_grid["to_ref"](x, y)
        pr = ref_grid["pix_ratio"]
    fw_r = ref_fwhm(x, y) / pr
    truth_r_src = render(rshape, xr, yr, flux_ref * ref_scale, fw_r, beta)
    yy, xx = np.mgrid[0:rshape[0], 0:rshape[1]]
    c0, gx, gy = ref_background
    bg = c0 + gx * xx + gy * yy
    truth_r = truth_r_src + bg
    var_r = np.full(rshape, sky_sigma_ref ** 2, np.float32)
    data_r = truth_r + rng.normal(0, 1, rshape) * np.sqrt(var_r + np.maximum(truth_r_src, 0) / egain_ref)
    mask_r = np.zeros(rshape, np.uint16)
    sat_r = data_r >= saturate_ref
    data_r = np.minimum(data_r, saturate_ref)
    mask_r[sat_r] |= int(MaskBit.SATURATED)
    mask_r[:, -30:] |= int(MaskBit.EDGE)     # the reference does not cover the last columns
    data_r[:, -30:] = 0.0
    var_r = np.where(mask_r == 0, var_r, 0).astype(np.float32)

    sci = SimImage(data_s.astype(np.float32), var_s, mask_s, egain_sci, saturate_sci, truth_s)
    ref = SimImage(data_r.astype(np.float32), var_r, mask_r, egain_ref, saturate_ref, truth_r)
    return SimPair(sci=sci, ref=ref, x=x, y=y, flux_sci=flux, flux_ref=flux_ref, variable=variable, tx=tx,
                   ty=ty, tflux=tflux, fwhm_sci=sci_fwhm, fwhm_ref=ref_fwhm, ref_scale=ref_scale,
                   info={"beta": beta, "shape": shape})


def aperture_sums(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Sum of ``image`` within ``radius`` px of each position (whole pixels whose centre is inside)."""
    half = int(np.ceil(radius)) + 1
    off = np.arange(-half, half + 1)
    out = np.zeros(len(x))
    for i, (cx, cy) in enumerate(zip(x, y, strict=False)):
        ix, iy = int(round(cx)), int(round(cy))
        sub = image[iy - half:iy + half + 1, ix - half:ix + half + 1]
        r = np.hypot(off[None, :] + ix - cx, off[:, None] + iy - cy)
        out[i] = sub[r <= radius].sum()
    return out


def aperture_any(mask: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """True where any pixel within ``radius`` (plus 1 px) of a position is non-zero in ``mask``."""
    half = int(np.ceil(radius)) + 1
    out = np.zeros(len(x), bool)
    for i, (cx, cy) in enumerate(zip(x, y, strict=False)):
        ix, iy = int(round(cx)), int(round(cy))
        out[i] = bool(np.any(mask[iy - half:iy + half + 1, ix - half:ix + half + 1] != 0))
    return out


def source_free(pair: SimPair, margin: float = 0.02) -> np.ndarray:
    """Pixels where the noise-free sources of both epochs are below ``margin`` x the science sky sigma."""
    src_s = pair.sci.truth
    src_r = render(pair.info["shape"], pair.x, pair.y, pair.flux_ref, pair.fwhm_sci(pair.x, pair.y),
                   pair.info["beta"])
    sig = float(np.sqrt(np.median(pair.sci.var[pair.sci.var > 0])))
    return (np.abs(src_s) < margin * sig) & (np.abs(src_r) < margin * sig)


def evaluate(pair: SimPair, diff: np.ndarray, noise: np.ndarray, mask: np.ndarray, ap_radius: float | None = None,
             rng_seed: int = 7, diff_fwhm: Callable | None = None, convolved: str = "reference") -> dict:
    """The acceptance statistics of a difference image against the pair's truth.

    Returns a dict with
    ``std_ratio``: std of diff/noise over source-free unmasked pixels;
    ``star_z``: residual aperture flux / sigma at non-variable unsaturated stars;
    ``t_ratio``, ``t_snr``: measured/true transient flux and S/N (large aperture);
    ``var_z``, ``var_expected``, ``var_measured``: the variable stars.
    The aperture sigma starts from the empirical variance of the same aperture at random
    source-free positions, so the noise correlations that the convolution introduces are
    included. The star's own photon noise comes from the noise image: as it is in the
    science image, it is white when the reference was convolved and is added as is; when the
    science was convolved it is correlated like the blank-sky noise and is scaled by the same
    factor (empirical / per-pixel-sum variance of the blank apertures). ``diff_fwhm`` is the PSF of the difference image (the
    blurrier of the two; default the science PSF), used for the truth of transients and
    variables.
    """
    dfw = diff_fwhm or pair.fwhm_sci
    rng = np.random.default_rng(rng_seed)
    h, w = diff.shape
    free = source_free(pair) & (mask == 0) & (noise > 0)
    ratio = diff[free] / noise[free]
    out = {"std_ratio": float(np.std(ratio)), "n_free": int(free.sum())}

    fw = float(np.median(pair.fwhm_sci(pair.x, pair.y)))
    r_ap = ap_radius or fw
    # empirical blank-aperture variance
    half = int(np.ceil(r_ap)) + 2
    bx, by = [], []
    for _ in range(20000):
        cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
        ix, iy = int(round(cx)), int(round(cy))
        if free[iy - half:iy + half + 1, ix - half:ix + half + 1].all():
            bx.append(cx)
            by.append(cy)
        if len(bx) >= 400:
            break
    bx, by = np.array(bx), np.array(by)
    blank = aperture_sums(diff, bx, by, r_ap)
    blank_var = float(np.var(blank))
    blank_model = float(np.mean(aperture_sums(noise ** 2, bx, by, r_ap)))
    out["blank_var"], out["blank_model_var"] = blank_var, blank_model

    inside = (pair.x > 30) & (pair.x < w - 30) & (pair.y > 30) & (pair.y < h - 30)
    # the residual of a star must not include a neighbour that really changed (variable star,
    # transient): exclude stars within r_ap + 4 FWHM of one
    reach = r_ap + 4.0 * fw
    vx, vy = pair.x[pair.variable], pair.y[pair.variable]
    near_change = np.array([np.any(np.hypot(pair.tx - a, pair.ty - b) < reach)
                            or np.any((np.hypot(vx - a, vy - b) < reach) & (np.hypot(vx - a, vy - b) > 0))
                            for a, b in zip(pair.x, pair.y, strict=False)])
    clean = inside & ~pair.variable & ~near_change & ~aperture_any(mask, pair.x, pair.y, r_ap + 2)
    sel = np.nonzero(clean)[0]
    resid = aperture_sums(diff, pair.x[sel], pair.y[sel], r_ap)
    model_var = aperture_sums(noise ** 2, pair.x[sel], pair.y[sel], r_ap)
    extra = np.maximum(model_var - blank_model, 0)
    if convolved == "science":
        extra = extra * max(blank_var / blank_model, 1.0)
    sig = np.sqrt(blank_var + extra)
    out["star_z"] = resid / sig
    out["star_flux"] = pair.flux_sci[sel]
    out["star_idx"] = sel

    # transients: large aperture against the noise-free science rendering of each one alone
    r_t = 3.0 * fw
    truth_t = aperture_sums(render((h, w), pair.tx, pair.ty, pair.tflux, dfw(pair.tx, pair.ty),
                                   pair.info["beta"]), pair.tx, pair.ty, r_t)
    meas_t = aperture_sums(diff, pair.tx, pair.ty, r_t)
    tvar = aperture_sums(noise ** 2, pair.tx, pair.ty, r_t)
    out["t_ratio"] = meas_t / truth_t
    out["t_snr"] = truth_t / np.sqrt(tvar * max(blank_var / max(blank_model, 1e-30), 1.0))
    out["t_ok_mask"] = ~aperture_any(mask, pair.tx, pair.ty, r_t)

    vi = np.nonzero(pair.variable)[0]
    vi = vi[~aperture_any(mask, pair.x[vi], pair.y[vi], r_t)]
    exp_v = aperture_sums(render((h, w), pair.x[vi], pair.y[vi], pair.flux_sci[vi] - pair.flux_ref[vi],
                                 dfw(pair.x[vi], pair.y[vi]), pair.info["beta"]),
                          pair.x[vi], pair.y[vi], r_t)
    out["var_expected"] = exp_v
    out["var_measured"] = aperture_sums(diff, pair.x[vi], pair.y[vi], r_t)
    kappa = max(blank_var / max(blank_model, 1e-30), 1.0)
    out["var_sigma"] = np.sqrt(kappa * aperture_sums(noise ** 2, pair.x[vi], pair.y[vi], r_t))
    out["var_fading"] = pair.flux_sci[vi] < pair.flux_ref[vi]
    return out


def acceptance_failures(ev: dict, min_star_fraction: float = 0.99) -> list[str]:
    """The issue's acceptance checks on :func:`evaluate` output; returns what failed."""
    fails = []
    if not 0.95 <= ev["std_ratio"] <= 1.10:
        fails.append(f"std(diff/noise) in source-free pixels = {ev['std_ratio']:.3f}, not in [0.95, 1.10]")
    frac = float(np.mean(np.abs(ev["star_z"]) < 3))
    if frac < min_star_fraction:
        fails.append(f"only {frac:.4f} of {ev['star_z'].size} non-variable stars within 3 sigma")
    ok = (ev["t_snr"] > 20) & ev["t_ok_mask"]
    if ok.sum() < 5:
        fails.append(f"only {ok.sum()} transients with S/N > 20")
    else:
        r, snr = ev["t_ratio"][ok], ev["t_snr"][ok]
        bad = np.abs(r - 1) > 0.03 + 3.0 / snr
        if bad.any():
            fails.append(f"transient flux ratios {np.round(r[bad], 3)} at S/N {np.round(snr[bad], 1)}")
        mean = float(np.sum(r * snr ** 2) / np.sum(snr ** 2))
        if abs(mean - 1) > 0.03:
            fails.append(f"mean transient flux ratio {mean:.4f} off by more than 3 %")
    dv = ev["var_measured"] - ev["var_expected"]
    bad_v = np.abs(dv) > 3 * ev["var_sigma"] + 0.03 * np.abs(ev["var_expected"])
    if bad_v.any():
        fails.append(f"variable stars off: measured {np.round(ev['var_measured'][bad_v])} "
                     f"expected {np.round(ev['var_expected'][bad_v])}")
    if not ev["var_fading"].any():
        fails.append("no fading variable to check")
    elif not np.all(ev["var_measured"][ev["var_fading"]] < 0):
        fails.append("a fading source is not negative in the difference")
    return fails
