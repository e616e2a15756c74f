"""A small, documented real/bogus score for difference-image detections.

Model: logistic regression, ``rb = 1 / (1 + exp(-(w . x + b)))``, on five shape features that
do not depend on brightness (so the score does not just repeat the S/N):

=================  ===========================================================================
``log_fwhm``       ln(FWHM_IMAGE / PEEING): cosmic rays and hot pixels are sharper than the PSF,
                   galaxy-subtraction residuals broader
``log_elong``      ln(ELONGATION / ELONG): trails, bad columns, moving-object streaks
``dipole``         fraction of the pixels within +-PEEING significantly of the opposite sign
``resid``          fraction of the flux not explained by the PSF: sqrt(max(chi2_r - 1, 0) n) / S/N
``log_sharp``      ln(peak pixel / peak of the fitted PSF)
=================  ===========================================================================

Fitting (:mod:`gppy_phot.rb_train`, re-run with ``python -m gppy_phot.rb_train``): synthetic
difference images with Gaussian noise into which real point sources (Moffat, beta 2.5-4.5 and
FWHM 3.5-6.5 px per image, S/N 5-100) and five kinds of artefacts are injected: cosmic-ray hits
(1-4 px), dipoles (a star minus itself shifted by 0.3-1.5 px), PSF-mismatch residuals (a
star minus a 10-30 % broader or narrower one), bad-column segments and broad blobs (residuals
of galaxies). The detections of the real pipeline are labelled by the nearest injected object
and the weights fitted by iteratively re-weighted least squares with a small L2 penalty. The
coefficients and the training figures are stored in ``rb_model.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FEATURES = ("log_fwhm", "log_elong", "dipole", "resid", "log_sharp")
MODEL_PATH = Path(__file__).resolve().parent / "rb_model.json"


def features(fwhm_px: np.ndarray, peeing_px: float, elongation: np.ndarray, elong_psf: float,
             dipole_frac: np.ndarray, chi2: np.ndarray, ncore: float, snr: np.ndarray,
             sharpness: np.ndarray) -> np.ndarray:
    """The (n, 5) feature matrix (see the module docstring); non-finite values are clipped to
    the edges of the training range."""
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.column_stack([
            np.log(np.clip(np.asarray(fwhm_px, float) / max(peeing_px, 0.1), 0.05, 20)),
            np.log(np.clip(np.asarray(elongation, float) / max(elong_psf, 1.0), 0.5, 20)),
            np.asarray(dipole_frac, float),
            np.sqrt(np.clip(np.asarray(chi2, float) - 1.0, 0, None) * ncore) / np.abs(np.asarray(snr, float)),
            np.log(np.clip(np.abs(np.asarray(sharpness, float)), 0.05, 50)),
        ])
    x[:, 3] = np.clip(np.nan_to_num(x[:, 3], nan=5.0, posinf=5.0), 0, 5)
    x[~np.isfinite(x)] = 0.0
    return x


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> tuple[np.ndarray, float,
                                                                                         np.ndarray, np.ndarray]:
    """IRLS fit of a logistic model on standardised features.

    Returns (weights, bias, mean, scale): the score is ``sigmoid(((x - mean) / scale) . w + b)``.
    """
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = np.column_stack([np.ones(len(x)), (x - mean) / scale])
    beta = np.zeros(z.shape[1])
    reg = l2 * np.eye(z.shape[1])
    reg[0, 0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(z @ beta)))
        w = np.clip(p * (1 - p), 1e-6, None)
        grad = z.T @ (y - p) - reg @ beta
        hess = (z * w[:, None]).T @ z + reg
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.max(np.abs(step)) < 1e-8:
            break
    return beta[1:], float(beta[0]), mean, scale


def load_model(path: Path = MODEL_PATH) -> dict:
    """The stored model: ``weights``, ``bias``, ``mean``, ``scale`` and training figures."""
    return json.loads(Path(path).read_text())


def score(x: np.ndarray, model: dict | None = None) -> np.ndarray:
    """Real/bogus probability (0 bogus ... 1 real) for a feature matrix from :func:`features`."""
    m = model or load_model()
    z = (x - np.asarray(m["mean"])) / np.asarray(m["scale"])
    return 1.0 / (1.0 + np.exp(-(z @ np.asarray(m["weights"]) + float(m["bias"]))))
