"""Small synthetic skies with known truth, for the phot tests and benchmarks.

Not a simulator of the telescope (that is :mod:`gppy.sim`): a TAN WCS, stars with known
total fluxes and a Moffat or Gaussian PSF, a flat sky, Poisson and read noise at a given gain,
an inverse-variance weight map and a uint16 mask, plus a Gaia-XP-like catalogue of the same
stars. Everything is vectorised (no Python loop over pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

PIXSCALE = 0.505


def make_wcs(nx: int, ny: int, ra0: float = 150.0, dec0: float = 2.0, pixscale: float = PIXSCALE,
             rot_deg: float = 0.0) -> WCS:
    """A TAN WCS centred on (ra0, dec0), north up and east left when ``rot_deg`` = 0.

    Parameters
    ----------
    nx, ny : int
        Image size (px).
    ra0, dec0 : float
        Centre (deg).
    pixscale : float
        Pixel scale (arcsec/px).
    rot_deg : float
        Rotation of the sky on the detector (deg, counter-clockwise).
    """
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    s = pixscale / 3600.0
    c, si = np.cos(np.deg2rad(rot_deg)), np.sin(np.deg2rad(rot_deg))
    w.wcs.cd = np.array([[-s * c, s * si], [s * si, s * c]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    return w


def psf_profile(r2: np.ndarray, fwhm: float, beta: float | None) -> np.ndarray:
    """Unnormalised PSF at squared radius ``r2`` (px^2): Moffat(beta) or Gaussian (beta None)."""
    if beta is None:
        sigma = fwhm / 2.3548200450309493
        return np.exp(-0.5 * r2 / sigma**2)
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (1.0 + r2 / alpha**2) ** (-beta)


def render_sources(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                   fwhm: float | np.ndarray, beta: float | None = 3.0, half: int | None = None,
                   oversample: int = 3, chunk: int = 2000) -> np.ndarray:
    """Image of point sources, each stamp normalised to its total ``flux``.

    Parameters
    ----------
    shape : (ny, nx)
        Output shape.
    x, y : array
        0-based pixel positions of the sources.
    flux : array
        Total flux of each source (image units); the stamp sums to it exactly (for sources
        whose stamp lies inside the image).
    fwhm : float or array
        PSF FWHM (px), per source if an array.
    beta : float or None
        Moffat index; None for a Gaussian.
    half : int, optional
        Stamp half-size (px); default 4 x max FWHM + 3.
    oversample : int
        Sub-pixel sampling per axis used to integrate the PSF over pixels.
    """
    ny, nx = shape
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    flux = np.asarray(flux, float)
    fw = np.broadcast_to(np.asarray(fwhm, float), x.shape)
    if half is None:
        half = int(np.ceil(4 * fw.max())) + 3 if len(fw) else 3
    out = np.zeros(ny * nx, dtype=np.float64)
    d = np.arange(-half, half + 1)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    for i0 in range(0, len(x), chunk):
        sl = slice(i0, i0 + chunk)
        xc, yc, fl, fwc = x[sl], y[sl], flux[sl], fw[sl]
        ix, iy = np.round(xc).astype(int), np.round(yc).astype(int)
        gx = ix[:, None] + d[None, :]                      # (n, m)
        gy = iy[:, None] + d[None, :]
        prof = np.zeros((len(xc), len(d), len(d)))
        for sy in sub:
            dy2 = (gy + sy - yc[:, None]) ** 2             # (n, m)
            for sx in sub:
                dx2 = (gx + sx - xc[:, None]) ** 2
                r2 = dy2[:, :, None] + dx2[:, None, :]
                prof += psf_profile(r2, fwc[:, None, None], beta)
        prof /= prof.sum(axis=(1, 2), keepdims=True)
        prof *= fl[:, None, None]
        yy = np.broadcast_to(gy[:, :, None], prof.shape)
        xx = np.broadcast_to(gx[:, None, :], prof.shape)
        ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
        out += np.bincount((yy[ok] * nx + xx[ok]), weights=prof[ok], minlength=ny * nx)
    return out.reshape(ny, nx)


@dataclass
class SyntheticField:
    """Truth of a synthetic field: the stars and the frame parameters."""

    wcs: WCS
    shape: tuple[int, int]
    ra: np.ndarray
    dec: np.ndarray
    x: np.ndarray
    y: np.ndarray
    mag: np.ndarray
    zp: float
    fwhm_px: float
    beta: float | None
    sky: float
    gain: float
    rdnoise: float
    filt: str = "m650"
    extra: dict = field(default_factory=dict)

    @property
    def flux(self) -> np.ndarray:
        """Total flux of each star in ADU (image units)."""
        return 10 ** (-0.4 * (self.mag - self.zp))

    @property
    def sky_sigma(self) -> float:
        """Background noise per pixel (ADU)."""
        return float(np.sqrt(self.sky / self.gain + (self.rdnoise / self.gain) ** 2))


def make_field(nx: int = 1000, ny: int = 1000, nstars: int = 800, zp: float = 28.0,
               fwhm_arcsec: float = 2.2, beta: float | None = 3.0, sky: float = 1200.0,
               gain: float = 0.256, rdnoise: float = 3.0, mag_range: tuple[float, float] = (13.0, 21.5),
               ra0: float = 150.0, dec0: float = 2.0, rot_deg: float = 0.7, seed: int = 1,
               filt: str = "m650", margin: int = 15) -> SyntheticField:
    """Draw a field: positions uniform, magnitudes with counts rising as 10^(0.3 m)."""
    rng = np.random.default_rng(seed)
    wcs = make_wcs(nx, ny, ra0, dec0, rot_deg=rot_deg)
    x = rng.uniform(margin, nx - 1 - margin, nstars)
    y = rng.uniform(margin, ny - 1 - margin, nstars)
    lo, hi = mag_range
    u = rng.uniform(0, 1, nstars)
    a = 0.3 * np.log(10)
    mag = np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a
    ra, dec = wcs.all_pix2world(x, y, 0)
    return SyntheticField(wcs=wcs, shape=(ny, nx), ra=ra, dec=dec, x=x, y=y, mag=mag, zp=zp,
                          fwhm_px=fwhm_arcsec / PIXSCALE, beta=beta, sky=sky, gain=gain,
                          rdnoise=rdnoise, filt=filt)


def noiseless_image(fld: SyntheticField, extra_sources: tuple | None = None) -> np.ndarray:
    """Sky plus stars (plus ``extra_sources`` = (x, y, flux)) without noise, in ADU."""
    x, y, f = fld.x, fld.y, fld.flux
    if extra_sources is not None:
        x = np.concatenate([x, extra_sources[0]])
        y = np.concatenate([y, extra_sources[1]])
        f = np.concatenate([f, extra_sources[2]])
    return fld.sky + render_sources(fld.shape, x, y, f, fld.fwhm_px, fld.beta)


def add_noise(model: np.ndarray, gain: float, rdnoise: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson (in electrons) plus Gaussian read noise; returns ADU as float32."""
    electrons = rng.poisson(np.clip(model, 0, None) * gain).astype(np.float64)
    electrons += rng.normal(0.0, rdnoise, model.shape)
    return (electrons / gain).astype(np.float32)


def frame_header(fld: SyntheticField, date_obs: str = "2024-04-23T03:28:04", exptime: float = 60.0,
                 obj: str = "T00001", saturate: float = 60000.0) -> fits.Header:
    """A 7DT-like header for the field (WCS, EGAIN, GAIN = camera setting, SATURATE...)."""
    h = fld.wcs.to_header()
    h["DATE-OBS"] = date_obs
    h["EXPTIME"] = exptime
    h["OBJECT"] = obj
    h["FILTER"] = fld.filt
    h["EGAIN"] = (fld.gain, "e-/ADU")
    h["GAIN"] = (2750, "camera gain setting")
    h["SATURATE"] = saturate
    h["TELESCOP"] = "7DT01"
    return h


def weight_map(fld: SyntheticField) -> np.ndarray:
    """Inverse background variance (ADU^-2), float32."""
    return np.full(fld.shape, 1.0 / fld.sky_sigma**2, dtype=np.float32)


def reference_table(fld: SyntheticField, epoch_offset_yr: float = 8.3, pm_scale: float = 20.0,
                    nan_pm_fraction: float = 0.05, seed: int = 2, first_row_nan: bool = True) -> Table:
    """A Gaia-XP-like catalogue of the field's stars at epoch 2016.0.

    Each star gets a proper motion (mas/yr) and its J2016 position is moved back so that the
    star is at its true image position ``epoch_offset_yr`` after 2016.0. A fraction of rows has
    no proper motion and no parallax (at their true position); by default the first row is one
    of them (v1 bug B13).
    """
    rng = np.random.default_rng(seed)
    n = len(fld.ra)
    pmra = rng.normal(0, pm_scale, n)
    pmdec = rng.normal(0, pm_scale, n)
    parallax = np.abs(rng.normal(1.0, 0.5, n))
    nan_rows = rng.uniform(0, 1, n) < nan_pm_fraction
    if first_row_nan and n:
        nan_rows[0] = True
    pmra[nan_rows] = np.nan
    pmdec[nan_rows] = np.nan
    parallax[nan_rows] = np.nan
    dec0 = fld.dec - np.where(nan_rows, 0, pmdec) * epoch_offset_yr / 3.6e6
    ra0 = fld.ra - np.where(nan_rows, 0, pmra) * epoch_offset_yr / 3.6e6 / np.cos(np.deg2rad(fld.dec))
    t = Table()
    t["source_id"] = np.arange(1, n + 1, dtype=np.int64) * 1000 + 7
    t["ra"] = ra0
    t["dec"] = dec0
    t["parallax"] = parallax
    t["pmra"] = pmra
    t["pmdec"] = pmdec
    t["phot_g_mean_mag"] = fld.mag + 0.1
    t["bp_rp"] = np.full(n, 0.8)
    t[f"mag_{fld.filt}"] = fld.mag
    for b in ("u", "g", "r", "i", "z"):
        t[f"mag_{b}"] = fld.mag + 0.05
    return t
