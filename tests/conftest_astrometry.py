"""Synthetic calibrated frames with a known, distorted WCS, for the astrometry and refcat tests.

The truth is built in pixel space: star pixel positions are drawn first, their sky positions
at the observation epoch follow from the true mapping (field distortion in the focal plane,
then a rotated TAN projection at 0.505"/px), and the catalogue's J2016.0 positions are those
epoch positions moved back along the stars' proper motions. The image is a pixel-integrated
Gaussian PSF for every star on a flat sky, with Poisson and read noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from scipy.special import erf

PIXSCALE = 0.505  # arcsec / px
GAIN = 1.3        # e- / ADU
SKY = 400.0       # ADU / px
READNOISE = 5.0   # e-
ZP = 28.0         # mag of 1 ADU total flux
FWHM = 3.6        # px


@dataclass
class Field:
    image: np.ndarray
    header: fits.Header           # calibrated-frame header: RA/DEC pointing, no WCS
    truth: Table                  # x, y (0-based px), ra, dec (deg at the epoch), mag, snr
    catalogue: Table              # Gaia-XP-like rows (J2016.0)
    obstime: Time
    true_wcs: dict = field(default_factory=dict)

    def true_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return pixel_to_sky(x, y, **self.true_wcs)


def distort(dx: np.ndarray, dy: np.ndarray, k3: float, q2: float) -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane distortion in pixels relative to the optical centre: a cubic radial term
    plus a small quadratic (decentring-like) term."""
    r2 = dx * dx + dy * dy
    return dx * (1 + k3 * r2) + q2 * dx * dy, dy * (1 + k3 * r2) + 0.5 * q2 * dx * dx


def pixel_to_sky(x, y, crval, crpix, angle_deg, k3, q2, scale=PIXSCALE):
    """True mapping: 0-based pixel -> (ra, dec) deg."""
    dx, dy = distort(np.asarray(x, float) - crpix[0], np.asarray(y, float) - crpix[1], k3, q2)
    th = np.deg2rad(angle_deg)
    s = scale / 3600.0
    # north up, east left, rotated by angle_deg: CD = R(angle) diag(-s, s) (as gppy.sim;
    # ROTANG1 = angle)
    cd = s * np.array([[-np.cos(th), -np.sin(th)], [-np.sin(th), np.cos(th)]])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = crval
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cd = cd
    ra, dec = w.wcs_pix2world(dx, dy, 0)
    return ra, dec


def _render(shape, xs, ys, fluxes, fwhm=FWHM, half=12):
    """Pixel-integrated circular Gaussians."""
    img = np.zeros(shape, np.float64)
    sig = fwhm / 2.3548
    norm = 1.0 / (np.sqrt(2) * sig)
    ny, nx = shape
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        ix, iy = int(round(x)), int(round(y))
        x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
        y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.arange(x0, x1 + 1) - 0.5 - x
        gy = np.arange(y0, y1 + 1) - 0.5 - y
        px = 0.5 * np.diff(erf(gx * norm))
        py = 0.5 * np.diff(erf(gy * norm))
        img[y0:y1, x0:x1] += f * np.outer(py, px)
    return img


def make_field(seed: int = 1, size: tuple[int, int] = (1536, 1024), nstars: int = 700,
               ra0: float = 150.0, dec0: float = 2.0, pointing_error_arcmin: tuple[float, float] = (0.0, 0.0),
               angle_deg: float = 0.0, k3: float = 2.5e-9, q2: float = 4e-7,
               date_obs: str = "2024-03-01T03:00:00", obj: str = "T01234", pm_scale: float = 1.0,
               filt: str = "m625", blank: bool = False, exptime: float = 60.0) -> Field:
    """A synthetic calibrated frame (ADU) and its truth.

    ``size`` is (nx, ny). The header's RA/DEC is the true centre offset by
    ``pointing_error_arcmin`` (east, north). ``k3`` gives about 0.5 px of radial distortion
    per 1000 px^3 ... at the corner of a 1536x1024 frame (923 px) the cubic term moves
    stars by k3*923^3 = 2.0 px (1.0").
    """
    rng = np.random.default_rng(seed)
    nx, ny = size
    crpix = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    obstime = Time(date_obs, format="isot", scale="utc")
    tw = dict(crval=[ra0, dec0], crpix=crpix, angle_deg=angle_deg, k3=k3, q2=q2)
    margin = 30
    # stars over a slightly larger area than the frame, so edges look natural
    xs = rng.uniform(-margin, nx - 1 + margin, nstars)
    ys = rng.uniform(-margin, ny - 1 + margin, nstars)
    # magnitudes: roughly a power law between 13 and 21
    u = rng.uniform(0, 1, nstars)
    mags = 13.0 + 8.0 * np.log10(1 + 999 * u) / 3.0
    ra, dec = pixel_to_sky(xs, ys, **tw)
    pmra = rng.normal(0, 8.0, nstars) * pm_scale
    pmdec = rng.normal(0, 8.0, nstars) * pm_scale
    parallax = np.abs(rng.normal(0.5, 0.5, nstars))
    # a few rows with missing proper motion / parallax and negative parallax
    bad = rng.choice(nstars, min(12, nstars), replace=False)
    pmra[bad[:4]] = np.nan
    pmdec[bad[:4]] = np.nan
    parallax[bad[4:8]] = np.nan
    parallax[bad[8:]] = -0.3
    # catalogue epoch positions: move back along the proper motion (missing pm: no motion)
    dt = obstime.tt.jyear - 2016.0
    cosd = np.cos(np.deg2rad(dec))
    has = np.isfinite(pmra)
    # first-order back-propagation, refined by one fixed-point step with the exact forward model
    from gppy.refcat import propagate_to_epoch
    cat_ra = ra - np.where(has, pmra, 0) * dt / 3.6e6 / cosd
    cat_dec = dec - np.where(has, pmdec, 0) * dt / 3.6e6
    for _ in range(3):
        t = Table({"ra": cat_ra, "dec": cat_dec, "pmra": pmra, "pmdec": pmdec})
        fra, fdec = propagate_to_epoch(t, obstime)
        cat_ra = cat_ra - (((fra - ra) + 180) % 360 - 180)
        cat_dec = cat_dec - (fdec - dec)
    catalogue = Table({
        "source_id": np.arange(1, nstars + 1, dtype=np.int64) + 10**15,
        "ra": cat_ra, "dec": cat_dec, "parallax": parallax, "pmra": pmra, "pmdec": pmdec,
        "phot_g_mean_mag": mags + rng.normal(0, 0.05, nstars), "bp_rp": rng.uniform(0.3, 2.0, nstars),
        f"mag_{filt}": mags,
    })
    fluxes = 10 ** (-0.4 * (mags - ZP))
    if blank:
        fluxes = fluxes * 0.0
    img = _render((ny, nx), xs, ys, fluxes) + SKY
    electrons = rng.poisson(np.clip(img * GAIN, 0, None)).astype(np.float64)
    electrons += rng.normal(0, READNOISE, electrons.shape)
    image = (electrons / GAIN - SKY).astype(np.float32)  # sky-subtracted is not needed; keep level 0
    image += np.float32(SKY)
    # S/N of each star in an optimal-ish aperture (Gaussian PSF, sky-limited + source noise)
    sig = FWHM / 2.3548
    npix_eff = 4 * np.pi * sig**2
    var = (fluxes * GAIN + npix_eff * (SKY * GAIN + READNOISE**2))
    snr = fluxes * GAIN / np.sqrt(var)
    inside = (xs >= 0) & (xs <= nx - 1) & (ys >= 0) & (ys <= ny - 1)
    truth = Table({"x": xs, "y": ys, "ra": ra, "dec": dec, "mag": mags, "snr": snr, "inside": inside})
    # header pointing: true centre moved by the pointing error (arcmin east, north)
    c_ra, c_dec = pixel_to_sky(np.array([crpix[0]]), np.array([crpix[1]]), **tw)
    pe, pn = pointing_error_arcmin
    hdr_dec = float(c_dec[0]) + pn / 60.0
    hdr_ra = float(c_ra[0]) + pe / 60.0 / np.cos(np.deg2rad(hdr_dec))
    h = fits.Header()
    h["OBJECT"] = obj
    h["FILTER"] = filt
    h["EXPTIME"] = exptime
    h["DATE-OBS"] = date_obs
    h["RA"] = (hdr_ra, "pointing RA (deg)")
    h["DEC"] = (hdr_dec, "pointing Dec (deg)")
    h["EGAIN"] = (GAIN, "e-/ADU")
    h["GAIN"] = 2750
    h["SATURATE"] = 60000.0
    h["TELESCOP"] = "7DT01"
    return Field(image=image, header=h, truth=truth, catalogue=catalogue, obstime=obstime, true_wcs=tw)


def write_calibrated(fld: Field, directory: Path, name: str = "calib_7DT01_T01234_20240301_030000_m625_60.fits",
                     mask: np.ndarray | None = None) -> tuple[Path, Path, Path]:
    """Write the frame, an inverse-variance weight and a uint16 mask as the calib stage does."""
    directory.mkdir(parents=True, exist_ok=True)
    img = directory / name
    stem = name[:-5]
    fits.PrimaryHDU(fld.image, fld.header).writeto(img, overwrite=True)
    var = (np.clip(fld.image, 0, None) * GAIN + READNOISE**2) / GAIN**2
    m = np.zeros(fld.image.shape, np.uint16) if mask is None else mask.astype(np.uint16)
    w = (1.0 / var).astype(np.float32)
    w[m != 0] = 0
    wpath = directory / f"{stem}.weight.fits"
    mpath = directory / f"{stem}.mask.fits"
    fits.PrimaryHDU(w).writeto(wpath, overwrite=True)
    fits.PrimaryHDU(m).writeto(mpath, overwrite=True)
    return img, wpath, mpath


def write_catalogue_csv(fld: Field, path: Path) -> Path:
    """The Gaia-XP-like CSV (blank fields for missing values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fld.catalogue.write(path, format="ascii.csv", overwrite=True)
    return path


# ----------------------------------------------------------------------------- simulator frames
@dataclass
class SimFrame:
    path: Path
    weight: Path
    mask: Path
    header: fits.Header
    stars: Table          # truth: ra, dec (true, mid-exposure), x_0based, y_0based, flux_adu, snr
    truth: dict           # truth/frames/<raw stem>.json
    raw: Path


def simulate_night(outdir: Path, seed: int = 5, size: tuple[int, int] = (1536, 1024),
                   filters: tuple[str, ...] = ("m625",), max_pointing_error_arcmin: float = 4.0,
                   max_rotation_deg: float = 1.5, distortion_arcsec: float = 1.0) -> Path:
    """A small simulated night (one tile, one visit per filter), masters archived; path.json."""
    from gppy.sim import simulate

    return simulate(outdir, size=size, targets=1, filters=list(filters), calib=False, transients=False,
                    references=True, extras=False, seed=seed,
                    max_pointing_error_arcmin=max_pointing_error_arcmin, max_rotation_deg=max_rotation_deg,
                    distortion_arcsec=distortion_arcsec)


def calibrate_sim_frame(root: Path, raw: Path, processed: Path, unit: str = "7DT01") -> SimFrame:
    """A calibrated frame as the calib stage would write it, from the simulator's *true* bias,
    dark and flat: float32 ADU, inverse-variance weight, uint16 mask (gppy.masks bits from
    the raw saturation and the simulator's cosmic-ray/trail/bad-pixel truth)."""
    import json

    from gppy.masks import MaskBit
    from gppy.naming import ProductDirs, calib_name

    tdir = root / "truth"
    t = json.loads((tdir / "frames" / f"{raw.stem}.json").read_text())
    with fits.open(raw) as h:
        data = np.asarray(h[0].data, dtype=np.float64)
        hdr = h[0].header.copy()
    bias = fits.getdata(tdir / "calib" / "bias.fits").astype(np.float64) + t["bias_offset_adu"]
    dark = fits.getdata(tdir / "calib" / "dark_current.fits").astype(np.float64) * hdr["EXPTIME"] / t["gain_e_per_adu"]
    flat = fits.getdata(tdir / "calib" / f"flat_{hdr['FILTER'].strip()}.fits").astype(np.float64)
    cal = ((data - bias - dark) / flat).astype(np.float32)
    with fits.open(tdir / "frames" / f"{raw.stem}.mask.fits") as h:
        tm = np.asarray(h[1].data)
    mask = np.zeros(cal.shape, np.uint16)
    mask[data >= 65535] |= np.uint16(MaskBit.SATURATED)
    mask[(tm & 1) != 0] |= np.uint16(MaskBit.COSMIC_RAY)
    mask[(tm & 2) != 0] |= np.uint16(MaskBit.TRAIL)
    mask[(tm & 24) != 0] |= np.uint16(MaskBit.BAD)
    g = t["gain_e_per_adu"]
    rn = t["read_noise_e"]
    var = (np.clip(cal * flat, 0, None) * g + rn ** 2) / g ** 2 / flat ** 2
    weight = (1.0 / var).astype(np.float32)
    weight[mask != 0] = 0
    out_hdr = hdr.copy()
    for k in ("BSCALE", "BZERO"):
        out_hdr.remove(k, ignore_missing=True)
    out_hdr["BITPIX"] = -32
    out_hdr["SATURATE"] = (float((65535 - bias.max() - dark.max()) / flat.max()), "[ADU] calibrated")
    out_hdr["EGAIN"] = (g, "e-/ADU")
    obj, filt = hdr["OBJECT"].strip(), hdr["FILTER"].strip()
    dirs = ProductDirs.of(processed, obj, unit, filt)
    dirs.base.mkdir(parents=True, exist_ok=True)
    path = dirs.base / calib_name(unit, obj, hdr["DATE-OBS"][:19], filt, hdr["EXPTIME"])
    fits.PrimaryHDU(cal, out_hdr).writeto(path, overwrite=True)
    wpath = path.with_name(path.name[:-5] + ".weight.fits")
    mpath = path.with_name(path.name[:-5] + ".mask.fits")
    fits.PrimaryHDU(weight).writeto(wpath, overwrite=True)
    fits.PrimaryHDU(mask).writeto(mpath, overwrite=True)
    stars = Table.read(tdir / "frames" / f"{raw.stem}.stars.csv", format="ascii.csv")
    # expected S/N of each star in an optimal aperture: Moffat-ish effective area
    # (1.5x a Gaussian's 4 pi sigma^2), sky and read noise at the frame's level
    fwhm_px = np.asarray(stars["fwhm_arcsec"], float) / PIXSCALE
    npix = 1.5 * 4 * np.pi * (fwhm_px / 2.3548) ** 2
    f_e = np.asarray(stars["flux_adu"], float) * g
    stars["snr"] = f_e / np.sqrt(f_e + npix * (t["sky_adu"] * g + rn ** 2))
    return SimFrame(path=path, weight=wpath, mask=mpath, header=out_hdr, stars=stars, truth=t, raw=raw)


def wcs_residuals(header: fits.Header, stars: Table, xcol: str = "x_0based", ycol: str = "y_0based"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(dRA cos(dec), dDec) in arcsec between a WCS evaluated at the true pixel positions and
    the true sky positions."""
    import warnings

    from astropy.wcs import FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(header, relax=True)
    ra, dec = w.all_pix2world(np.asarray(stars[xcol], float), np.asarray(stars[ycol], float), 0)
    dra = ((ra - np.asarray(stars["ra"], float) + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(dec)) * 3600.0
    ddec = (dec - np.asarray(stars["dec"], float)) * 3600.0
    return dra, ddec


# ------------------------------------------------------------------ catalogue-level star lists
@dataclass
class StarLists:
    """What the coarse matcher sees (detections, reference) and the truth behind it."""

    x: np.ndarray                 # detection centroids, FITS 1-based px
    y: np.ndarray
    flux: np.ndarray              # detection fluxes (ADU)
    true_ra: np.ndarray           # true position of each detection (deg; NaN for artefacts)
    true_dec: np.ndarray
    ref_ra: np.ndarray            # reference catalogue (deg) and its magnitudes (another band)
    ref_dec: np.ndarray
    ref_mag: np.ndarray
    ra0: float                    # header pointing (deg)
    dec0: float
    nx: int
    ny: int
    centroid_sigma_arcsec: float
    nsaturated: int


def make_star_lists(seed: int, size: tuple[int, int] = (1536, 1024), pointing_error_arcmin=(0.0, 0.0),
                    angle_deg: float = 0.0, ra0: float = 150.0, dec0: float = -35.0,
                    density_per_deg2: float = 55000.0, mag_range: tuple[float, float] = (10.0, 21.5),
                    det_limit_mag: float = 19.5, saturation_mag: float = 13.0, ref_limit_mag: float = 21.5,
                    colour_sigma_mag: float = 0.3, artefact_fraction: float = 0.03,
                    centroid_sigma_px: float = 0.1) -> StarLists:
    """A star field and what the coarse matcher gets from it, without images.

    Stars are drawn uniformly on the tangent plane at the header pointing, over the frame plus
    the pointing error plus 3' all round, with a power-law luminosity function
    (N(<m) ~ 10^(0.3 m)) over ``mag_range``. The frame's true WCS is a TAN projection at the
    true centre (the header pointing moved by ``pointing_error_arcmin`` east, north), rotated
    by ``angle_deg`` like gppy.sim's (east left, north up at 0). Detections are the stars on
    the frame between ``saturation_mag`` (brighter ones are saturated: flagged and dropped
    before matching) and ``det_limit_mag``, with Gaussian centroid noise, plus artefacts at
    random places; the reference holds every star brighter than ``ref_limit_mag``, with
    magnitudes in another band (``colour_sigma_mag`` of colour scatter).
    """
    from gppy_astrometry.match import tan_deproject, tan_project

    rng = np.random.default_rng(seed)
    nx, ny = size
    half = np.hypot(nx, ny) * PIXSCALE / 2.0
    pe, pn = pointing_error_arcmin
    ext = half + np.hypot(pe, pn) * 60.0 + 180.0
    area_deg2 = (2 * ext / 3600.0) ** 2
    n = rng.poisson(density_per_deg2 * area_deg2)
    xi = rng.uniform(-ext, ext, n)
    eta = rng.uniform(-ext, ext, n)
    lo, hi = mag_range
    u = rng.uniform(0, 1, n)
    f0 = 10 ** (-0.3 * (hi - lo))
    mag = hi + np.log10(u * (1 - f0) + f0) / 0.3
    ra, dec = tan_deproject(xi, eta, ra0, dec0)
    # true centre and pixel positions (exact TAN at the true centre, rotated)
    c_ra, c_dec = tan_deproject(np.array([pe * 60.0]), np.array([pn * 60.0]), ra0, dec0)
    e, nn = tan_project(ra, dec, float(c_ra[0]), float(c_dec[0]))
    th = np.deg2rad(angle_deg)
    # sky (e, n) = R(th) @ (east, north); east = -(x - cx) s, north = (y - cy) s
    east = np.cos(th) * e + np.sin(th) * nn
    north = -np.sin(th) * e + np.cos(th) * nn
    cx, cy = (nx + 1) / 2.0, (ny + 1) / 2.0
    x = cx - east / PIXSCALE
    y = cy + north / PIXSCALE
    on = (x >= 0.5) & (x <= nx + 0.5) & (y >= 0.5) & (y <= ny + 0.5)
    det = on & (mag >= saturation_mag) & (mag < det_limit_mag)
    nsat = int(np.sum(on & (mag < saturation_mag)))
    dx = x[det] + rng.normal(0, centroid_sigma_px, det.sum())
    dy = y[det] + rng.normal(0, centroid_sigma_px, det.sum())
    flux = 10 ** (-0.4 * (mag[det] + rng.normal(0, 0.03, det.sum()) - ZP))
    nart = int(artefact_fraction * det.sum())
    ax = rng.uniform(1, nx, nart)
    ay = rng.uniform(1, ny, nart)
    aflux = 10 ** (-0.4 * (rng.uniform(saturation_mag, det_limit_mag, nart) - ZP))
    nan = np.full(nart, np.nan)
    ref = mag < ref_limit_mag
    return StarLists(x=np.r_[dx, ax], y=np.r_[dy, ay], flux=np.r_[flux, aflux],
                     true_ra=np.r_[ra[det], nan], true_dec=np.r_[dec[det], nan],
                     ref_ra=ra[ref], ref_dec=dec[ref], ref_mag=mag[ref] + rng.normal(0, colour_sigma_mag, ref.sum()),
                     ra0=ra0, dec0=dec0, nx=nx, ny=ny, centroid_sigma_arcsec=centroid_sigma_px * PIXSCALE,
                     nsaturated=nsat)
