"""Fit the real/bogus model of :mod:`gppy_phot.realbogus` on synthetic difference images.

``python -m gppy_phot.rb_train [--out rb_model.json] [--images 4] [--seed 1]``

Each training image is pure Gaussian noise (sigma = 10) plus objects on a grid (40 px apart):
half real point sources (Moffat, FWHM 3.5-6.5 px and beta 2.5-4.5 per image, given to the
search as SEEING and COGBETA as the science header does; S/N 5-100), half artefacts
of five kinds (:func:`add_object`). The real detection pipeline
(:func:`gppy_phot.transient_products.search`, with a neutral model) measures the features;
each detection is labelled by the injected object within 3 px (noise peaks, which no model can
tell from faint stars, are left out), and a logistic regression is fitted
(:func:`gppy_phot.realbogus.fit_logistic`). The written JSON holds the weights and the
training figures (numbers per class, recall of real sources per S/N bin, bogus rejection).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy_phot import realbogus
from gppy_phot import synthetic as syn
from gppy_phot.matching import match_pixels
from gppy_phot.transients import TransientParams

KINDS = ("real", "cosmic", "dipole", "mismatch", "column", "blob")
SIGMA = 10.0


def _psf_snr_flux(snr: float, fwhm: float) -> float:
    """Flux giving a PSF-optimal S/N ``snr`` for a Gaussian-equivalent PSF in noise SIGMA."""
    s = fwhm / 2.3548
    return snr * SIGMA * np.sqrt(4 * np.pi) * s


def add_object(img: np.ndarray, kind: str, x: float, y: float, fwhm: float, rng: np.random.Generator,
               beta_img: float = 3.5) -> None:
    """Add one object of ``kind`` at (x, y) to ``img`` in place (``beta_img``: the image's PSF)."""
    shape = img.shape
    beta = beta_img * rng.uniform(0.9, 1.1)
    if kind == "real":
        f = _psf_snr_flux(np.exp(rng.uniform(np.log(5), np.log(100))), fwhm)
        img += syn.render_sources(shape, [x], [y], [f], fwhm * rng.uniform(0.92, 1.08), beta, half=25)
    elif kind == "cosmic":
        npx = int(rng.integers(1, 5))
        ix, iy = int(round(x)), int(round(y))
        for _ in range(npx):
            img[iy, ix] += rng.uniform(6, 60) * SIGMA
            if rng.uniform() < 0.5:
                ix += int(rng.integers(-1, 2))
            else:
                iy += int(rng.integers(-1, 2))
    elif kind == "dipole":
        f = _psf_snr_flux(np.exp(rng.uniform(np.log(40), np.log(1500))), fwhm)
        d = rng.uniform(0.3, 1.5)
        a = rng.uniform(0, 2 * np.pi)
        img += syn.render_sources(shape, [x + d * np.cos(a)], [y + d * np.sin(a)], [f], fwhm, beta, half=25)
        img -= syn.render_sources(shape, [x], [y], [f], fwhm, beta, half=25)
    elif kind == "mismatch":
        f = _psf_snr_flux(np.exp(rng.uniform(np.log(100), np.log(3000))), fwhm)
        k = rng.choice([rng.uniform(0.7, 0.9), rng.uniform(1.1, 1.35)])
        img += syn.render_sources(shape, [x], [y], [f], fwhm, beta, half=25)
        img -= syn.render_sources(shape, [x], [y], [f], fwhm * k, beta, half=25)
    elif kind == "column":
        n = int(rng.integers(5, 40))
        ix, iy = int(round(x)), int(round(y))
        img[max(0, iy - n // 2):iy + n // 2, ix] += rng.uniform(3, 20) * SIGMA
    elif kind == "blob":
        f = _psf_snr_flux(np.exp(rng.uniform(np.log(10), np.log(150))), fwhm) * 3
        img += syn.render_sources(shape, [x], [y], [f], fwhm * rng.uniform(2.5, 5.0), None, half=25)


def training_image(rng: np.random.Generator, n: int = 1500, spacing: int = 40):
    """(diff, header, objects) with objects = (x, y, kind index)."""
    fwhm = rng.uniform(3.5, 6.5)
    beta_img = rng.uniform(2.5, 4.5)
    img = np.zeros((n, n))
    xs, ys = np.meshgrid(np.arange(spacing, n - spacing, spacing), np.arange(spacing, n - spacing, spacing))
    xs = xs.ravel() + rng.uniform(-3, 3, xs.size)
    ys = ys.ravel() + rng.uniform(-3, 3, ys.size)
    kinds = np.where(rng.uniform(size=xs.size) < 0.5, 0, rng.integers(1, len(KINDS), xs.size))
    for x, y, k in zip(xs, ys, kinds, strict=True):
        add_object(img, KINDS[k], x, y, fwhm, rng, beta_img)
    img += rng.normal(0, SIGMA, img.shape)
    h = syn.make_wcs(n, n).to_header()
    h["SEEING"] = fwhm * syn.PIXSCALE
    h["PEEING"] = fwhm
    h["ELLIP"] = 0.05
    h["ELONG"] = 1.05
    h["COGBETA"] = beta_img
    h["FILTER"] = "m650"
    h["DATE-OBS"] = "2024-04-23T03:28:04"
    for k in ("AUTO", "0", "1", "2", "3", "4", "5"):
        h[f"ZP_{k}"] = 28.0
        h[f"EZP_{k}"] = 0.01
    return img.astype(np.float32), h, (xs, ys, kinds)


def measure(rng: np.random.Generator, workdir: Path):
    """Features and labels (kind index) of the detections of one training image."""
    from gppy_phot.transient_products import search

    diff, h, (xs, ys, kinds) = training_image(rng)
    path = workdir / "diff.fits"
    fits.writeto(path, diff, h, overwrite=True)
    neutral = {"weights": [0.0] * len(realbogus.FEATURES), "bias": 0.0, "mean": [0.0] * len(realbogus.FEATURES),
               "scale": [1.0] * len(realbogus.FEATURES)}
    # the noise is known exactly here, and the image is crowded with objects: no recalibration
    res = search(path, diff, fits.getheader(path), np.full(diff.shape, SIGMA, np.float32), None, None, None, 0.0,
                 None, None, [], workdir / "se", rb_model=neutral,
                 tparams=TransientParams(calibrate_noise=False))
    t = res.transients
    idx, _ = match_pixels(np.asarray(t["X_IMAGE"]) - 1, np.asarray(t["Y_IMAGE"]) - 1, xs, ys, 3.0)
    keep = idx >= 0
    x = np.column_stack([np.asarray(t[f"rb_{f}"], float) for f in realbogus.FEATURES])[keep]
    return x, kinds[idx[keep]], np.asarray(t["snr_psf"], float)[keep], np.asarray(t["sign"])[keep]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(realbogus.MODEL_PATH))
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    xs, ks, snrs, signs = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.images):
            x, k, s, sg = measure(rng, Path(tmp))
            xs.append(x)
            ks.append(k)
            snrs.append(s)
            signs.append(sg)
    x, k, snr, sign = np.vstack(xs), np.concatenate(ks), np.concatenate(snrs), np.concatenate(signs)
    # the real class: positive detections of real sources; their negative side-lobes are not objects
    real = (k == 0) & (sign > 0)
    use = (k != 0) | real
    x, y, k, snr = x[use], real[use].astype(float), k[use], snr[use]
    w, b, mean, scale = realbogus.fit_logistic(x, y)
    model = {"features": list(realbogus.FEATURES), "weights": w.tolist(), "bias": b, "mean": mean.tolist(),
             "scale": scale.tolist()}
    p = realbogus.score(x, model)
    stats = {"n": {KINDS[i]: int((k == i).sum()) for i in range(len(KINDS))},
             "real_recall_at_0.5": {}, "bogus_rejected_at_0.5": {}}
    for lo, hi in ((5, 7), (7, 10), (10, 20), (20, 1e9)):
        sel = (y == 1) & (np.abs(snr) >= lo) & (np.abs(snr) < hi)
        stats["real_recall_at_0.5"][f"snr {lo}-{hi:g}"] = round(float((p[sel] >= 0.5).mean()), 4) if sel.any() else None
    for i in range(1, len(KINDS)):
        sel = k == i
        stats["bogus_rejected_at_0.5"][KINDS[i]] = round(float((p[sel] < 0.5).mean()), 4) if sel.any() else None
    model["training"] = {"images": args.images, "seed": args.seed, "sigma": SIGMA, **stats}
    Path(args.out).write_text(json.dumps(model, indent=1) + "\n")
    print(json.dumps(model["training"], indent=1))


if __name__ == "__main__":
    main()
