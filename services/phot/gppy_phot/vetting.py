"""The vetting score of difference-image detections: boosted trees trained on simulated nights.

The v1 flags (:func:`gppy_phot.transients.vetting_flags`) are hand-set cuts, each on one
measurement. Beside bright stars they fail both ways: a real transient on a star's
subtraction residual is cut by the residual terms, and a residual lobe that passes them is a
false candidate. The score here weighs the same measurements together (:data:`FEATURES`, each
a column ``vet_<name>`` of the transient catalogue) and gives the probability that the
detection is an astrophysical source.

Model: gradient-boosted decision trees (scikit-learn's ``HistGradientBoostingClassifier``,
logistic loss), stored as plain arrays in ``vetting_model.json`` and evaluated here with NumPy
alone (:func:`score`): ``p = sigmoid(baseline + sum of the trees' leaf values)``.

Fitting (``scripts/train_vetting.py``): nights of the simulator (:mod:`gppy.sim`) go through the
pipeline's science (stack, subtraction, transient search); every detection is labelled real
when it lies within the match radius of an injected transient and bogus when it lies beyond
1.5 FWHM of all of them (detections in between are left out). The nights of the CI test
(seed 21) are never used for training. ``vetting_model.json`` holds the trees, the seeds
used and the figures measured on nights left out of the fit.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

MODEL_PATH = Path(__file__).resolve().parent / "vetting_model.json"

#: Feature names, in the model's order (column ``vet_<name>`` of the transient catalogue).
FEATURES = (
    "snr_stat",        # PSF-fit S/N on D with the difference's noise only
    "snr_psf",         # the same with the residual terms of stars and of the surroundings as noise
    "ring_scatter",    # ln(1 + star ring scatter / PSF-flux error)
    "local",           # ln(1 + residual structure around the detection / PSF-flux error)
    "ring_mean",       # star ring residual at the detection's distance / PSF-flux error
    "local_chi",       # chi2 of that structure
    "star_other",      # star residual of the other sign on the same circle (flag_star_residual's ratio)
    "dipole",          # fraction of pixels within +-PEEING of the opposite sign
    "lobe_ratio",      # opposite-sign lobe within 1.5 FWHM / the detection's flux
    "lobe_snr",        # its S/N
    "log_chi2",        # ln reduced chi2 of the PSF fit
    "log_sharp",       # ln(peak pixel / fitted PSF peak)
    "log_fwhm",        # ln(FWHM_IMAGE / PEEING) (0 when unmeasured)
    "log_elong",       # ln(ELONGATION / ELONG)
    "masked_frac",     # PSF information on masked pixels
    "ref_min",         # convolved-reference aperture flux in sigmas of its scatter
    "sign",            # +1 D, -1 -D
    "star_dist",       # distance to the star whose light dominates there (FWHM, <= 10)
    "star_ratio",      # log10(that star's flux / the detection's flux)
    "star_light",      # ln(1 + stars' Moffat-weighted light there / PSF-flux error)
    "star_tangential", # ln(tangential / radial second moment) of the detection's light, about that star
    "star_offset",     # radial offset of the light's centroid from the detection, away from that star (FWHM)
    "sat_dist",        # distance to the nearest saturated pixel (FWHM, <= 20)
    "peak_only",       # 1 for matched-filter peaks Source Extractor merged into a neighbour
    "rb_shape",        # the shape-only logistic score of gppy_phot.realbogus
    "sci_convolved",   # 1 when the science was convolved (the difference has the reference's PSF)
)

STAR_DIST_MAX = 10.0
SAT_DIST_MAX = 20.0


def star_context(x: np.ndarray, y: np.ndarray, flux: np.ndarray, err: np.ndarray,
                 stars: tuple[np.ndarray, np.ndarray, np.ndarray] | None, fwhm_px: float,
                 beta: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each detection (0-based x, y; PSF flux and error): the distance (FWHM) to the star
    whose light dominates there, log10 of that star's flux over the detection's,
    ln(1 + the stars' light there / error), and that star's index in ``stars`` (-1: none). The
    light is each star's flux times a Moffat (``beta``, default 2.5) of the image's FWHM
    normalised to 1 at the centre, over the stars within 6 FWHM and beyond 0.5 FWHM (the
    detection's own source)."""
    n = len(x)
    dist = np.full(n, STAR_DIST_MAX)
    ratio = np.full(n, -3.0)
    light = np.zeros(n)
    which = np.full(n, -1)
    if stars is None or len(stars[0]) == 0 or n == 0:
        return dist, ratio, light, which
    from scipy.spatial import cKDTree

    sx, sy, sf = (np.asarray(a, float) for a in stars)
    sf = np.clip(np.nan_to_num(sf), 0, None)
    b = 2.5 if beta is None else float(beta)
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / b) - 1.0))
    tree = cKDTree(np.column_stack([sx, sy]))
    for i, nb in enumerate(tree.query_ball_point(np.column_stack([x, y]), 6 * fwhm_px)):
        if not nb:
            continue
        nb = np.asarray(nb)
        d = np.hypot(sx[nb] - x[i], sy[nb] - y[i])
        keep = d > 0.5 * fwhm_px
        if not keep.any():
            continue
        nb, d = nb[keep], d[keep]
        w = sf[nb] * (1.0 + (d / alpha) ** 2) ** (-b)
        k = int(np.argmax(w))
        which[i] = nb[k]
        dist[i] = min(d[k] / fwhm_px, STAR_DIST_MAX)
        ratio[i] = np.log10(max(sf[nb[k]], 1e-9) / max(abs(flux[i]), 1e-9))
        light[i] = np.log1p(float(w.sum()) / max(err[i], 1e-9))
    return dist, ratio, light, which


def star_aligned_shape(diff: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray, sign: np.ndarray,
                       star_x: np.ndarray, star_y: np.ndarray, fwhm_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Shape of each detection's light about the star beside it (NaN without a star).

    The positive part of ``sign x D`` within a Gaussian window (sigma 0.6 FWHM) around the
    detection, in axes radial and tangential to the star: ln of the tangential over the radial
    second moment (a residual lobe is an arc around the star, a source is round) and the
    centroid's radial offset from the detection in FWHM (positive away from the star).
    """
    n = len(x)
    tang = np.full(n, np.nan)
    off = np.full(n, np.nan)
    ny, nx = diff.shape
    h = int(np.ceil(1.5 * fwhm_px))
    gy, gx = np.mgrid[-h:h + 1, -h:h + 1]
    for i in range(n):
        if not np.isfinite(star_x[i]):
            continue
        xi, yi = int(round(x[i])), int(round(y[i]))
        if xi - h < 0 or yi - h < 0 or xi + h >= nx or yi + h >= ny:
            continue
        ux, uy = x[i] - star_x[i], y[i] - star_y[i]
        norm = np.hypot(ux, uy)
        if norm <= 0:
            continue
        ux, uy = ux / norm, uy / norm
        sl = (slice(yi - h, yi + h + 1), slice(xi - h, xi + h + 1))
        dx, dy = gx + xi - x[i], gy + yi - y[i]
        w = np.exp(-(dx**2 + dy**2) / (2 * (0.6 * fwhm_px) ** 2))
        if bad is not None:
            w = w * ~bad[sl]
        v = np.clip(np.nan_to_num(diff[sl] * sign[i]), 0, None) * w
        tot = v.sum()
        if tot <= 0:
            continue
        rr = dx * ux + dy * uy
        tt = -dx * uy + dy * ux
        mr, mt = (v * rr).sum() / tot, (v * tt).sum() / tot
        mrr = (v * (rr - mr) ** 2).sum() / tot
        mtt = (v * (tt - mt) ** 2).sum() / tot
        tang[i] = np.log(max(mtt, 1e-6) / max(mrr, 1e-6))
        off[i] = mr / fwhm_px
    return tang, off


def saturation_distance(saturated: np.ndarray | None, x: np.ndarray, y: np.ndarray, fwhm_px: float) -> np.ndarray:
    """Distance (FWHM, at most :data:`SAT_DIST_MAX`) from each 0-based (x, y) to the nearest
    True pixel of ``saturated``."""
    out = np.full(len(x), SAT_DIST_MAX)
    if saturated is None or len(x) == 0:
        return out
    iy, ix = np.nonzero(saturated)
    if len(iy) == 0:
        return out
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.column_stack([ix, iy])).query(np.column_stack([x, y]), k=1)
    return np.minimum(d / fwhm_px, SAT_DIST_MAX)


def feature_matrix(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The (n, len(FEATURES)) matrix from a mapping name -> array; non-finite values are NaN
    (the trees send them down their learnt 'missing' branch)."""
    x = np.column_stack([np.asarray(columns[f], float) for f in FEATURES]) if columns else np.zeros((0, len(FEATURES)))
    x[~np.isfinite(x)] = np.nan
    return x


@lru_cache(maxsize=4)
def model_id(path: Path = MODEL_PATH) -> str:
    """First 12 hex digits of the SHA-256 of the model file (recorded in the provenance)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


@lru_cache(maxsize=4)
def load_model(path: Path = MODEL_PATH) -> dict:
    """The stored model: ``baseline``, ``trees`` (arrays per tree), ``features`` and its training
    record (read once per path; not to be modified)."""
    return json.loads(Path(path).read_text())


def score(x: np.ndarray, model: dict | None = None) -> np.ndarray:
    """Probability (0 bogus ... 1 real) of each row of ``x`` (:func:`feature_matrix`)."""
    m = model or load_model()
    if tuple(m["features"]) != FEATURES:
        raise ValueError(f"vetting model features {m['features']} are not this code's {FEATURES}")
    n = len(x)
    raw = np.full(n, float(m["baseline"]))
    rows = np.arange(n)
    for t in m["trees"]:
        feat = np.asarray(t["feature"], int)
        thr = np.asarray(t["threshold"], float)
        left = np.asarray(t["left"], int)
        right = np.asarray(t["right"], int)
        leaf = np.asarray(t["leaf"], bool)
        miss_left = np.asarray(t["missing_left"], bool)
        value = np.asarray(t["value"], float)
        node = np.zeros(n, int)
        for _ in range(int(t["depth"]) + 1):
            active = ~leaf[node]
            if not active.any():
                break
            v = x[rows, feat[node]]
            go_left = np.where(np.isnan(v), miss_left[node], v <= thr[node])
            node = np.where(active, np.where(go_left, left[node], right[node]), node)
        raw += value[node]
    return 1.0 / (1.0 + np.exp(-raw))
