"""Synthetic calibrated singles with known truth, for the stack tests and benchmark.

Each frame is what the calib + astrometry + phot stages hand to the stack stage: a float32
image in ADU with sky, Gaussian stars of known magnitude, Poisson and read noise at a known
gain; a TAN WCS (with a small pointing offset and rotation per frame); ``<stem>.weight.fits``
= inverse variance of the background in ADU^-2 (0 where masked); ``<stem>.mask.fits``
(uint16 MaskBit) with cosmic rays and a bad column; header keys EGAIN, SATURATE, EXPTIME,
DATE-OBS, DATE-LOC, AIRMASS, CENTALT, CENTAZ, OBJECT, FILTER, OBJCTRA/OBJCTDEC and the
zero point ``ZP_AUTO`` (mag for 1 ADU in that frame), which here is the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

from gppy.masks import MaskBit
from gppy.naming import calib_name

PIXSCALE = 0.505


@dataclass
class Truth:
    """Truth of a set of frames."""

    ra: np.ndarray                   # star RA (deg)
    dec: np.ndarray                  # star Dec (deg)
    mag: np.ndarray                  # star magnitude
    zps: list[float] = field(default_factory=list)        # per frame, mag for 1 ADU
    paths: list[Path] = field(default_factory=list)
    headers: list[fits.Header] = field(default_factory=list)
    gain: float = 0.256
    read_noise_e: float = 3.5
    cosmic_pixels: list[tuple[int, int, int]] = field(default_factory=list)  # (frame, y, x)


def tan_wcs(nx: int, ny: int, ra0: float, dec0: float, rot_deg: float = 0.0,
            dx: float = 0.0, dy: float = 0.0) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [(nx + 1) / 2.0 + dx, (ny + 1) / 2.0 + dy]
    s = PIXSCALE / 3600.0
    c, si = np.cos(np.deg2rad(rot_deg)), np.sin(np.deg2rad(rot_deg))
    w.wcs.cd = np.array([[-s * c, s * si], [s * si, s * c]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    return w


def render_gaussians(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                     fwhm: float, half: int = 12) -> np.ndarray:
    """Pixel-integrated Gaussian stars (0-based centres), each summing to ``flux``."""
    ny, nx = shape
    img = np.zeros(shape, dtype=np.float64)
    sig = fwhm / 2.3548200450309493
    x0 = np.floor(x).astype(int)
    y0 = np.floor(y).astype(int)
    off = np.arange(-half, half + 1)
    gx = x0[:, None] + off[None, :]
    gy = y0[:, None] + off[None, :]
    s2 = np.sqrt(2.0) * sig
    px = 0.5 * (erf((gx + 0.5 - x[:, None]) / s2) - erf((gx - 0.5 - x[:, None]) / s2))
    py = 0.5 * (erf((gy + 0.5 - y[:, None]) / s2) - erf((gy - 0.5 - y[:, None]) / s2))
    stamps = flux[:, None, None] * py[:, :, None] * px[:, None, :]
    yy = np.broadcast_to(gy[:, :, None], stamps.shape)
    xx = np.broadcast_to(gx[:, None, :], stamps.shape)
    ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    np.add.at(img, (yy[ok], xx[ok]), stamps[ok])
    return img


def star_field(ra0: float, dec0: float, n: int, half_w_deg: float, half_h_deg: float, seed: int,
               mag_range=(14.0, 20.5)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stars on a jittered grid over a ``2 half_w x 2 half_h`` box (kept apart so that
    apertures and background annuli do not overlap neighbours), random magnitudes."""
    rng = np.random.default_rng(seed)
    aspect = half_w_deg / half_h_deg
    ny_ = max(1, int(np.ceil(np.sqrt(n / aspect))))
    nx_ = int(np.ceil(n / ny_))
    ux = (np.arange(nx_) + 0.5) / nx_ * 2 - 1
    uy = (np.arange(ny_) + 0.5) / ny_ * 2 - 1
    gx, gy = np.meshgrid(ux, uy)
    gx = gx.ravel()[:n] + rng.uniform(-0.15, 0.15, n) / nx_
    gy = gy.ravel()[:n] + rng.uniform(-0.15, 0.15, n) / ny_
    dec = dec0 + gy * half_h_deg
    ra = ra0 + gx * half_w_deg / np.cos(np.deg2rad(dec0))
    mag = rng.uniform(*mag_range, n)
    return ra, dec, mag


def make_frames(outdir: Path, *, n: int = 3, shape=(1000, 1400), ra0: float = 150.0, dec0: float = 2.0,
                obj: str = "T90001", filt: str = "m650", unit: str = "7DT07", exptimes=None,
                start: str = "2025-01-02T03:00:00", gaps_s=None, zp1s: float = 23.0, transparency=None,
                sky_e_per_s: float = 25.0, fwhm_px=None, gain: float = 0.256, read_noise_e: float = 3.5,
                seed: int = 1, nstars: int = 120, cosmics: int = 30, saturate: float = 60000.0,
                bright_star: bool = True, write_zp: bool = True, stars=None,
                mag_range=(14.0, 20.5)) -> Truth:
    """Write ``n`` calibrated singles into ``outdir`` and return their truth."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ny, nx = shape
    exptimes = list(exptimes or [60.0] * n)
    gaps_s = list(gaps_s or [15.0] * n)
    transparency = list(transparency or [1.0] * n)
    fwhm_px = list(fwhm_px or [4.0 + 0.4 * i for i in range(n)])
    if stars is None:
        deg = PIXSCALE / 3600.0
        ra, dec, mag = star_field(ra0, dec0, nstars, 0.45 * nx * deg, 0.43 * ny * deg, seed, mag_range)
    else:
        ra, dec, mag = stars
    if bright_star:  # one star that saturates its core
        ra = np.append(ra, ra0 + 0.3 * PIXSCALE * 40 / 3600.0)
        dec = np.append(dec, dec0 + 0.3 * PIXSCALE * 40 / 3600.0)
        mag = np.append(mag, 9.5)
    truth = Truth(ra=ra, dec=dec, mag=mag, gain=gain, read_noise_e=read_noise_e)
    t = datetime.fromisoformat(start)
    rn_adu = read_noise_e / gain
    for i in range(n):
        rot = rng.uniform(-0.3, 0.3)
        w = tan_wcs(nx, ny, ra0, dec0, rot, dx=rng.uniform(-25, 25), dy=rng.uniform(-25, 25))
        zp = zp1s + 2.5 * np.log10(exptimes[i]) + 2.5 * np.log10(transparency[i]) - 2.5 * np.log10(gain)
        # zp: mag for 1 ADU in this frame (zp1s = mag for 1 e-/s at transparency 1)
        flux_adu = 10 ** (-0.4 * (mag - zp))
        x, y = w.all_world2pix(ra, dec, 0)
        sky_adu = sky_e_per_s * exptimes[i] / gain
        model = sky_adu + render_gaussians((ny, nx), x, y, flux_adu, fwhm_px[i])
        electrons = rng.poisson(np.clip(model, 0, None) * gain).astype(np.float64)
        img = electrons / gain + rng.normal(0.0, rn_adu, (ny, nx))
        mask = np.zeros((ny, nx), np.uint16)
        sat = img >= saturate
        img[sat] = saturate
        mask[sat] |= np.uint16(MaskBit.SATURATED)
        cy = rng.integers(5, ny - 5, cosmics)
        cx = rng.integers(5, nx - 5, cosmics)
        img[cy, cx] += rng.uniform(2000, 20000, cosmics)
        mask[cy, cx] |= np.uint16(MaskBit.COSMIC_RAY)
        truth.cosmic_pixels.extend((i, int(a), int(b)) for a, b in zip(cy, cx, strict=True))
        col = int(rng.integers(50, nx - 50))
        mask[:, col] |= np.uint16(MaskBit.BAD)
        img[:, col] = 0.0
        var = sky_adu / gain + rn_adu**2
        weight = np.where(mask == 0, 1.0 / var, 0.0).astype(np.float32)
        h = w.to_header()
        date_obs = t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        h["DATE-OBS"] = date_obs
        h["DATE-LOC"] = (t - timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        h["MJD"] = 0.0  # overwritten below
        from astropy.time import Time

        h["MJD"] = Time(date_obs, format="isot", scale="utc").mjd
        h["EXPTIME"] = float(exptimes[i])
        h["EGAIN"] = gain
        h["GAIN"] = 2750
        h["SATURATE"] = saturate
        h["OBJECT"] = obj
        h["FILTER"] = filt
        h["TELESCOP"] = unit
        c = SkyCoord(ra0, dec0, unit="deg")
        h["OBJCTRA"] = c.ra.to_string(unit="hourangle", sep=" ", precision=1)
        h["OBJCTDEC"] = c.dec.to_string(unit="deg", sep=" ", precision=1, alwayssign=True)
        h["AIRMASS"] = 1.1 + 0.05 * i
        h["CENTALT"] = 65.0 - 2.0 * i
        h["CENTAZ"] = (355.0 + 4.0 * i) % 360.0
        if write_zp:
            h["ZP_AUTO"] = zp
            h["EZP_AUTO"] = 0.005
        h["SKYVAL"] = sky_adu
        name = calib_name(unit, obj, date_obs, filt, exptimes[i])
        path = outdir / name
        fits.writeto(path, img.astype(np.float32), h, overwrite=True)
        fits.writeto(path.with_name(name[:-5] + ".weight.fits"), weight, h, overwrite=True)
        fits.writeto(path.with_name(name[:-5] + ".mask.fits"), mask, overwrite=True)
        truth.zps.append(zp)
        truth.paths.append(path)
        truth.headers.append(h)
        t = t + timedelta(seconds=exptimes[i] + gaps_s[i])
    return truth


def aperture_sums(image: np.ndarray, x: np.ndarray, y: np.ndarray, r: float, r_in: float, r_out: float,
                  weight: np.ndarray):
    """Circular aperture sums (0-based centres) minus the mean of an annulus, and the
    variance predicted from the weight map for that difference:
    ``sum_ap(1/w) + N_ap**2 * sum_ann(1/w) / N_ann**2``. Whole pixels (centre inside).

    Returns (sums, predicted variances, ok) where ok says that no aperture pixel is masked
    and most of the annulus is valid.
    """
    half = int(np.ceil(r_out)) + 1
    sums, preds, ok = [], [], []
    ny, nx = image.shape
    for xc, yc in zip(x, y, strict=True):
        x0, y0 = int(round(xc)), int(round(yc))
        if x0 - half < 0 or y0 - half < 0 or x0 + half >= nx or y0 + half >= ny:
            sums.append(np.nan)
            preds.append(np.nan)
            ok.append(False)
            continue
        sub = image[y0 - half:y0 + half + 1, x0 - half:x0 + half + 1]
        wsub = weight[y0 - half:y0 + half + 1, x0 - half:x0 + half + 1]
        yy, xx = np.mgrid[y0 - half:y0 + half + 1, x0 - half:x0 + half + 1]
        rr = np.hypot(xx - xc, yy - yc)
        ap = rr <= r
        ann = (rr >= r_in) & (rr <= r_out)
        good = bool(np.all(wsub[ap] > 0)) and np.sum(wsub[ann] > 0) > 0.8 * ann.sum()
        ann = ann & (wsub > 0)
        if not good:
            sums.append(np.nan)
            preds.append(np.nan)
            ok.append(False)
            continue
        vals = sub[ann]
        chi = (vals - np.median(vals)) * np.sqrt(wsub[ann])
        keep = np.abs(chi) < 5.0
        n_ap, n_ann = ap.sum(), keep.sum()
        bkg = vals[keep].mean()
        sums.append(float(sub[ap].sum() - bkg * n_ap))
        preds.append(float(np.sum(1.0 / wsub[ap]) + n_ap**2 * np.sum(1.0 / wsub[ann][keep]) / n_ann**2))
        ok.append(True)
    return np.array(sums), np.array(preds), np.array(ok)


def clean_stars(mask, weight, x, y, r=14):
    """Stars whose surroundings every input covers: no SATURATED pixel within 12 px and a
    stack weight uniform to 1 % within ``r`` px. Where an input is masked (a bad column, a
    cosmic ray, a saturated core) the weighted mean takes that spot from the other inputs,
    whose seeing differs, so a star there is measured on a locally different PSF: the
    weight map shows it (reduced weight), and it is not a test of the flux scale."""
    out = []
    for a, b in zip(x, y, strict=True):
        i, j = int(round(b)), int(round(a))
        sat = np.any(mask[max(i - 12, 0):i + 13, max(j - 12, 0):j + 13] & MaskBit.SATURATED)
        ws = weight[max(i - r, 0):i + r + 1, max(j - r, 0):j + r + 1]
        out.append(bool(not sat and ws.size and ws.min() > 0.99 * ws.max()))
    return np.array(out)


# ---------------------------------------------------------------------- simulated nights
SIM_MASK_BITS = {1: MaskBit.COSMIC_RAY, 2: MaskBit.TRAIL, 4: MaskBit.SATURATED, 8: MaskBit.BAD, 16: MaskBit.BAD}


@dataclass
class SimFrame:
    """A simulated science frame turned into a calibrated single (with the truth)."""

    raw: Path
    calib: Path
    header: fits.Header
    truth: dict
    stars: object            # astropy Table of truth/frames/<stem>.stars.csv
    visit: int               # the simulator's visit index


def simulate_fixed_targets(outdir: Path, night: str, seed: int, fixed: list[dict] | None = None,
                           sky_seed: int | None = None, **kw) -> Path:
    """``gppy.sim.simulate`` of one night whose targets are forced to ``fixed`` (dicts
    ``name``, ``ra``, ``dec``, ``tile`` as in truth/night.json) and whose star fields are drawn
    with ``sky_seed``.

    The simulator places each night's targets near that night's meridian and draws tiles,
    stars and noise from one seed; a deep stack needs the same field and the same stars on
    several nights with independent noise, hence different ``seed`` and a common ``sky_seed``.
    Returns the path.json.
    """
    import gppy.sim.night as sim_night

    original_plan, original_field = sim_night.make_plan, sim_night.make_starfield

    def make_plan(*args, **kwargs):
        plan = original_plan(*args, **kwargs)
        for k, (tg, target) in enumerate(zip(plan.targets, fixed or [], strict=False)):
            tg.name, tg.ra, tg.dec = target["name"], float(target["ra"]), float(target["dec"])
            tg.tile_id = int(target["name"][1:]) if target.get("tile") else None
            for spec in plan.frames:
                if spec.target == k:
                    spec.obj = target["name"]
        return plan

    def make_starfield(ra0, dec0, hw, hh, density, rng, **kwargs):
        if sky_seed is not None:
            k = int(kwargs.get("id_base", 0) // 10**15)
            rng = np.random.default_rng([sky_seed, 4, k])
        return original_field(ra0, dec0, hw, hh, density, rng, **kwargs)

    sim_night.make_plan, sim_night.make_starfield = make_plan, make_starfield
    try:
        return sim_night.simulate(outdir, night=night, seed=seed, **kw)
    finally:
        sim_night.make_plan, sim_night.make_starfield = original_plan, original_field


def calibrate_sim_night(path_json: Path, processed: Path | None = None) -> list[SimFrame]:
    """Stand in for the calib, astrometry and phot stages with the simulator's truth.

    Each science frame becomes ``calib_<UNIT>_<OBJ>_..._<EXPTIME>.fits`` in the processed
    tree: ``(raw - bias - dark) / flat`` with the true bias (plus the frame's offset), dark
    current and flat; the true TPV WCS; ``ZP_AUTO`` = the true zero point (mag for 1 ADU),
    ``SEEING`` = the true median FWHM; a weight map = the inverse of the background variance
    (sky model, dark current and read noise through the flat, 0 where masked) and a uint16
    mask from the true cosmic-ray, trail, saturation, bad-column and hot-pixel maps.
    """
    import ast
    import json

    from astropy.table import Table

    from gppy.config import PathConfig
    from gppy.naming import ProductDirs

    root = Path(path_json).parent
    cfg = PathConfig.load(path_json)
    processed = Path(processed or cfg.path_processed)
    night = json.loads((root / "truth" / "night.json").read_text())
    night_dir = Path(night["night_dir"])
    bias = fits.getdata(root / "truth" / "calib" / "bias.fits").astype(np.float64)
    dark = fits.getdata(root / "truth" / "calib" / "dark_current.fits").astype(np.float64)
    visit_of = {f: v["index"] for v in night["visits"] for f in v["frames"]}
    flats: dict[str, np.ndarray] = {}
    out = []
    for fr in night["frames"]:
        if fr["kind"] != "science":
            continue
        raw_path = night_dir / fr["file"]
        stem = fr["file"][:-5]
        tj = json.loads((root / "truth" / "frames" / f"{stem}.json").read_text())
        filt = fr["filter"]
        if filt not in flats:
            flats[filt] = fits.getdata(root / "truth" / "calib" / f"flat_{filt}.fits").astype(np.float64)
        flat = flats[filt]
        with fits.open(raw_path) as hd:
            raw = hd[0].data.astype(np.float64)
            h = hd[0].header.copy()
        t = float(fr["exptime"])
        g = float(tj["gain_e_per_adu"])
        dark_adu = dark * t / g
        img = (raw - bias - tj["bias_offset_adu"] - dark_adu) / flat
        with fits.open(root / "truth" / "frames" / f"{stem}.mask.fits") as hd:
            tmask = np.asarray(hd[1].data)
        mask = np.zeros(img.shape, np.uint16)
        for bit, mb in SIM_MASK_BITS.items():
            mask[(tmask & bit) != 0] |= np.uint16(mb)
        ny, nx = img.shape
        yy, xx = np.mgrid[0:ny, 0:nx]
        gx, gy = tj["sky_gradient_per_frame"]
        sky = tj["sky_adu"] * (1 + gx * (xx - (nx - 1) / 2) / nx + gy * (yy - (ny - 1) / 2) / ny)
        var_raw = (np.clip(sky * flat + dark_adu, 0, None)) / g + tj["read_noise_adu"] ** 2
        weight = np.where(mask == 0, flat**2 / var_raw, 0.0).astype(np.float32)
        for key in ("BZERO", "BSCALE", "BITPIX"):
            h.remove(key, ignore_missing=True)
        wcs_h = fits.Header.fromstring(tj["wcs_header"], sep="\n")
        h.update(wcs_h)
        h["ZP_AUTO"] = (tj["zp_adu"], "true zero point (mag for 1 ADU)")
        h["SEEING"] = (tj["fwhm_median_arcsec"], "true median FWHM (arcsec)")
        h["SATURATE"] = (float(np.min((65535.0 - bias - dark_adu) / flat)), "calibrated ADU")
        h["SKYVAL"] = tj["sky_adu"]
        name = calib_name(h["TELESCOP"], h["OBJECT"], h["DATE-OBS"], h["FILTER"], h["EXPTIME"])
        dest = ProductDirs.of(processed, h["OBJECT"], h["TELESCOP"], h["FILTER"]).base / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        fits.writeto(dest, img.astype(np.float32), h, overwrite=True)
        fits.writeto(dest.with_name(name[:-5] + ".weight.fits"), weight, overwrite=True)
        fits.writeto(dest.with_name(name[:-5] + ".mask.fits"), mask, overwrite=True)
        tj["psf"] = ast.literal_eval(tj["psf"]) if isinstance(tj["psf"], str) else tj["psf"]
        stars = Table.read(root / "truth" / "frames" / f"{stem}.stars.csv", format="ascii.csv")
        out.append(SimFrame(raw_path, dest, h, tj, stars, visit_of[fr["file"]]))
    return out


def moffat_enclosed(r: float, fwhm_px: np.ndarray, beta: float) -> np.ndarray:
    """Fraction of a circular Moffat's flux within radius ``r`` (px)."""
    alpha = np.asarray(fwhm_px) / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return 1.0 - (1.0 + r**2 / alpha**2) ** (1.0 - beta)


def covered_by_all(calib_paths, ra, dec, r: float) -> np.ndarray:
    """True for positions that every input covers with unmasked pixels within ``r`` + 4 px
    (so the stack there is a combination of all inputs, with no hole filled by a subset)."""
    ok = np.ones(len(ra), bool)
    half = int(np.ceil(r)) + 4
    for p in calib_paths:
        p = Path(p)
        h = fits.getheader(p)
        mask = fits.getdata(p.with_name(p.name[:-5] + ".mask.fits"))
        ny, nx = mask.shape
        x, y = WCS(h).all_world2pix(np.asarray(ra), np.asarray(dec), 0)
        for k in np.nonzero(ok)[0]:
            i, j = int(round(y[k])), int(round(x[k]))
            if i - half < 0 or j - half < 0 or i + half >= ny or j + half >= nx:
                ok[k] = False
            elif mask[i - half:i + half + 1, j - half:j + half + 1].any():
                ok[k] = False
    return ok


def trail_distance(frame, ra, dec):
    """Distance (px, in that frame) of positions from the frame's satellite trail (inf if none)."""
    tr = frame.truth.get("trail")
    if not tr:
        return np.full(len(ra), np.inf)
    x, y = WCS(frame.header).all_world2pix(np.asarray(ra), np.asarray(dec), 0)
    pts = [v for k, v in tr.items() if isinstance(v, list) and len(v) == 2 and k.startswith("p")]
    (x1, y1), (x2, y2) = pts[:2]
    return np.abs((x2 - x1) * (y1 - y) - (x1 - x) * (y2 - y1)) / np.hypot(x2 - x1, y2 - y1)


def measure_sim_stars(frames, result, r: float = 10.0):
    """Stack aperture fluxes of the reference frame's stars against the truth in stack units,
    corrected by the enclosed fraction of the true PSFs mixed with the stack's weights."""
    img, h = fits.getdata(result.path), fits.getheader(result.path)
    w = fits.getdata(result.weight_path)
    st0 = frames[0].stars  # the reference (first) frame defines the units
    x, y = WCS(h).all_world2pix(st0["ra"], st0["dec"], 0)
    total = 10 ** (-0.4 * (np.asarray(st0["mag"]) - h["STKZP"]))
    n = len(frames)
    factors = np.array([h[f"FSCL{i + 1:03d}"] for i in range(n)])
    typical = []
    for f in frames:
        wi = fits.getdata(f.calib.with_name(f.calib.name[:-5] + ".weight.fits"))
        typical.append(np.median(wi[wi > 0]))
    share = np.array(typical) / factors**2
    share /= share.sum()
    enclosed = np.zeros(len(st0))
    for a, f in zip(share, frames, strict=True):
        fwhm = dict(zip(f.stars["source_id"], f.stars["fwhm_arcsec"], strict=True))
        fw = np.array([fwhm.get(s, np.nan) for s in st0["source_id"]]) / 0.505
        enclosed += a * moffat_enclosed(r, fw, f.truth["psf"]["beta"])
    expected = total * enclosed
    s, pred, ok = aperture_sums(img, x, y, r, r + 6, r + 20, w)
    # isolated: all other stars within r + 25 px sum to < 0.5 % of the star (they would bias
    # the annulus by < 0.1 % of its flux)
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(d, np.inf)
    isolated = np.array([total[d[k] < r + 25].sum() < 0.005 * total[k] for k in range(len(total))])
    off_trail = np.all([trail_distance(f, st0["ra"], st0["dec"]) > r + 30 for f in frames], axis=0)
    unsaturated = np.asarray(st0["saturated"]) == 0
    clean = ok & isolated & off_trail & unsaturated & np.isfinite(expected)
    clean &= covered_by_all([f.calib for f in frames], st0["ra"], st0["dec"], r + 6)
    err = np.sqrt(pred + expected / h["EGAIN"])
    return s, expected, err, clean, h
