"""Reference data as v1 reads it: the Gaia-XP-like catalogue, and reference images.

Reference images (``ref_PS1_*`` and ``ref_7DT_*``) are sky-subtracted float32 images in
*counts* with ``MAGZERO``: a source of AB magnitude m has a total of
``10**(-0.4 * (m - MAGZERO))`` counts. Their noise is Gaussian with the per-pixel sigma
``SKYSIG`` (counts) plus Poisson noise of the sources with ``EGAIN`` (e-/count). Pixels without data are exactly 0
(a survey chip gap). The background-only inverse variance is ``1 / SKYSIG**2`` where the image
is not 0; the 7DT reference also has it as ``<stem>.weight.fits``.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table

from gppy.sim.catalog import StarField
from gppy.sim.instrument import ALL_FILTERS
from gppy.sim.optics import FrameWCS, PSFModel, moffat_neff
from gppy.sim.render import render_moffat

REF_MAGZERO = 28.0
REF_EGAIN = 20.0


def gaia_table(field: StarField, rng: np.random.Generator, gmax: float = 21.0,
               filters: list[str] | None = None) -> Table:
    """Gaia DR3 + XP-synthetic-photometry-like table (measured values, epoch 2016.0).

    About 3 % of rows (and always the first row) have no proper motion or parallax (a
    2-parameter solution); faint stars often have negative parallaxes.
    """
    sel = np.flatnonzero(field.gmag < gmax)
    n = sel.size
    g = field.gmag[sel]
    plx_err = 0.02 + 0.5 * 10 ** (0.4 * (g - 20.0))
    pm_err = 0.02 + 0.6 * 10 ** (0.4 * (g - 20.0))
    parallax = field.parallax[sel] + rng.normal(0, 1, n) * plx_err
    pmra = field.pmra[sel] + rng.normal(0, 1, n) * pm_err
    pmdec = field.pmdec[sel] + rng.normal(0, 1, n) * pm_err
    two_par = (rng.uniform(0, 1, n) < 0.03) | (g > 20.7) & (rng.uniform(0, 1, n) < 0.3)
    if n:
        two_par[0] = True
    t = Table()
    t["source_id"] = field.source_id[sel]
    t["ra"] = field.ra[sel]
    t["dec"] = field.dec[sel]
    t["parallax"] = np.ma.masked_array(parallax, two_par)
    t["pmra"] = np.ma.masked_array(pmra, two_par)
    t["pmdec"] = np.ma.masked_array(pmdec, two_par)
    t["phot_g_mean_mag"] = g + rng.normal(0, 0.003, n)
    t["bp_rp"] = field.bp_rp[sel] + rng.normal(0, 1, n) * (0.005 + 0.05 * 10 ** (0.4 * (g - 20.0)))
    err = 0.005 + 0.03 * 10 ** (0.4 * (g - 19.0))
    for f in filters or ALL_FILTERS:
        t[f"mag_{f}"] = field.mag(f)[sel] + rng.normal(0, 1, n) * err
    for col in t.colnames:
        if col not in ("source_id",):
            t[col].info.format = ".7f" if col in ("ra", "dec") else ".4f"
    return t


def reference_image(field: StarField, wcs: FrameWCS, size: tuple[int, int], filt: str, epoch: float,
                    psf: PSFModel, depth5: float, rng: np.random.Generator,
                    extra_sources: list[tuple[float, float, float]] | None = None,
                    gap: bool = False, magzero: float = REF_MAGZERO,
                    with_weight: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Render a reference image.

    Parameters
    ----------
    depth5 : float
        5-sigma point-source depth (AB mag) for PSF-optimal photometry; sets SKYSIG.
    extra_sources : list of (ra, dec, mag)
        Sources present only in the reference (e.g. a source that later fades).
    gap : bool
        Blank a stripe (value 0, weight 0), like a chip gap of a survey warp.
    with_weight : bool
        Also return the background-only inverse-variance image (else None).

    Returns
    -------
    data, weight, info
        ``data`` float32 (counts); noise drawn in float32, in bands of rows.
    """
    nx, ny = size
    img = np.zeros((ny, nx), np.float32)
    ra, dec = field.positions_at(epoch)
    mags = field.mag(filt)
    if extra_sources:
        ra = np.concatenate([ra, [s[0] for s in extra_sources]])
        dec = np.concatenate([dec, [s[1] for s in extra_sources]])
        mags = np.concatenate([mags, [s[2] for s in extra_sources]])
    x, y = wcs.world_to_pixel(ra, dec)
    ok = (x > -100) & (x < nx + 100) & (y > -100) & (y < ny + 100)
    flux = 10 ** (-0.4 * (mags[ok] - magzero))
    fwhm, ell, theta = psf.at(x[ok], y[ok], size, scale=wcs.scale_arcsec)
    render_moffat(img, x[ok], y[ok], flux, fwhm, psf.beta, ell, theta, floor_adu=0.02 * 1.0)
    f5 = 10 ** (-0.4 * (depth5 - magzero))
    neff = float(moffat_neff(psf.fwhm_arcsec / wcs.scale_arcsec, psf.beta))
    skysig = f5 / (5.0 * np.sqrt(neff))
    # background noise (sigma SKYSIG) + Poisson noise of the sources (EGAIN e-/count), in place
    noisy = img
    for r0 in range(0, ny, 256):
        band = noisy[r0:r0 + 256]
        src = np.maximum(band, np.float32(0.0))
        src *= np.float32(1.0 / REF_EGAIN)
        np.sqrt(src, out=src)
        src *= rng.standard_normal(band.shape, dtype=np.float32)
        band += src
        src = rng.standard_normal(band.shape, dtype=np.float32)
        src *= np.float32(skysig)
        band += src
    weight = np.full(img.shape, 1.0 / skysig ** 2, np.float32) if with_weight else None
    if gap:
        x0 = int(nx * 0.62)
        noisy[:, x0:x0 + max(8, nx // 60)] = 0.0
        if weight is not None:
            weight[:, x0:x0 + max(8, nx // 60)] = 0.0
    info = {"magzero": magzero, "skysig_counts": float(skysig), "depth5_ab": depth5,
            "egain_e_per_count": REF_EGAIN, "epoch": epoch, "psf": psf.to_dict(),
            "scale_arcsec": wcs.scale_arcsec, "rotation_deg": wcs.rotation_deg,
            "wcs_header": wcs.tan_header().tostring(sep="\n"), "gap": gap,
            "size": [nx, ny]}
    return noisy, weight, info


def reference_header(wcs: FrameWCS, info: dict, obj: str, filt: str, survey: str,
                     exptime: float = 0.0) -> fits.Header:
    """Header of a reference image: TAN WCS, MAGZERO, SKYSIG, EGAIN, SEEING, FILTER, OBJECT."""
    h = wcs.tan_header()
    h["OBJECT"] = (obj, "target")
    h["FILTER"] = (filt, "filter")
    h["EXPTIME"] = (float(exptime), "[s] total exposure (0: unknown)")
    h["MAGZERO"] = (info["magzero"], "AB mag of a source with 1 count in total")
    h["SKYSIG"] = (round(info["skysig_counts"], 6), "[counts] per-pixel background noise")
    h["SKYVAL"] = (0.0, "[counts] background (subtracted)")
    h["EGAIN"] = (info["egain_e_per_count"], "[e-/count] for source Poisson noise")
    h["SATURATE"] = (1e9, "[counts] no saturation")
    h["SEEING"] = (round(info["psf"]["fwhm_center_arcsec"], 3), "[arcsec] PSF FWHM")
    h["BUNIT"] = ("counts", "sky-subtracted")
    h["REFSURV"] = (survey, "reference survey")
    h["EPOCH"] = (info["epoch"], "epoch of the star positions (yr)")
    h["SWCREATE"] = ("gppy-sim", "Software that created this file")
    return h
