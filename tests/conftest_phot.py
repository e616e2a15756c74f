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


# ------------------------------------------------------------------ simulated nights, stack -> difference
def _load_conftest(name: str):
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_sim_night(root: Path, seed: int, size: tuple[int, int] = (1280, 900), targets: int = 2,
                  filters: tuple[str, ...] = ("m650",), n_transients: int = 8, star_density: float = 55000.0,
                  extras: bool = True) -> tuple[Path, list[dict]]:
    """A simulated night (gppy.sim, with its transients and references) through the pipeline's
    own science from the calibrated singles on: photometry of every single, the stack of
    every visit (the stack stage's ``build_visit_stack``), photometry of the stack, the
    difference against the simulator's reference (the subtract stage's ``subtract_files``,
    native engine) and the transient search of the phot stage (``difference_products``).

    The calib and astrometry stages are stood in for by the truth (true bias, dark, flat, mask
    and TPV WCS: ``conftest_stack.calibrate_sim_night``), so that what is measured here is the
    photometry, stacking, subtraction and transient search.

    Returns the path.json and, per visit, a dict with the visit, the stack, the
    ``DifferenceDone`` event and the ``phot.done`` figures of the difference.
    """
    import json

    from gppy.config import load_settings
    from gppy.messages import DifferenceDone
    from gppy.sim import simulate
    from gppy_phot.photometry import PhotParams
    from gppy_phot.service import photometry_products, transient_params
    from gppy_phot.transient_products import difference_products
    from gppy_stack.service import StackService
    from gppy_subtract import reference as sref
    from gppy_subtract.engine import EngineError
    from gppy_subtract.service import SubtractService

    cs = _load_conftest("conftest_stack")
    pj = Path(simulate(root, targets=targets, filters=list(filters), size=size, seed=seed, calib=False,
                       n_transients=n_transients, star_density=star_density, extras=extras))
    settings = load_settings(config=str(pj), log_json=False)
    paths = settings.paths()
    processed, refcat = Path(paths.path_processed), Path(paths.path_refcat)
    scratch = Path(paths.path_scratch) / "phot"
    frames = cs.calibrate_sim_night(pj)
    night = json.loads((pj.parent / "truth" / "night.json").read_text())
    truth = pj.parent / "truth"
    bias = fits.getdata(truth / "calib" / "bias.fits").astype(np.float64)
    dark = fits.getdata(truth / "calib" / "dark_current.fits").astype(np.float64)
    for f in frames:
        # the saturation of the calibrated frame over its good pixels (as the calib stage
        # computes it): the stand-in's minimum over every pixel reaches the hot pixels of a
        # 300-s dark and goes negative
        flat = fits.getdata(truth / "calib" / f"flat_{f.header['FILTER']}.fits").astype(np.float64)
        mpath = f.calib.with_name(f.calib.name[:-5] + ".mask.fits")
        good = fits.getdata(mpath) == 0
        sat = (65535.0 - bias - f.truth["bias_offset_adu"] - dark * f.header["EXPTIME"] / f.truth["gain_e_per_adu"]) / flat
        f.header["SATURATE"] = (float(np.min(sat[good])), "calibrated ADU")
        with fits.open(f.calib, mode="update") as hd:
            hd[0].header["SATURATE"] = f.header["SATURATE"]
    params = PhotParams()
    for f in frames:
        h = f.header
        photometry_products(f.calib, f.calib.with_name(f.calib.name[:-5] + ".weight.fits"),
                            f.calib.with_name(f.calib.name[:-5] + ".mask.fits"), h["OBJECT"], h["FILTER"],
                            h["TELESCOP"], processed, refcat, scratch, params, "single")
    stack_svc = StackService(settings)
    sub_svc = SubtractService(settings)
    out = []
    for v in night["visits"]:
        fs = [f for f in frames if f.visit == v["index"]]
        unit = str(fs[0].header["TELESCOP"])
        record = {"unit": unit, "object": v["target"], "filter": v["filter"], "night_dir": night["night_dir"],
                  "visit": f"sim{v['index']}"}
        res = stack_svc.build_visit_stack(record, [str(f.calib) for f in fs])
        photometry_products(res.path, res.weight_path, res.mask_path, v["target"], v["filter"], unit, processed,
                            refcat, scratch, params, "stack")
        ref = sref.find_reference(Path(paths.ref_frame), v["target"], v["filter"])
        try:
            prods = sub_svc.subtract_files(res.path, ref, v["filter"], "native")
        except EngineError as exc:      # the service answers diff.done ok=False: nothing to search
            out.append({"visit": v, "frames": fs, "stack": res, "event": None, "error": str(exc)})
            continue
        ev = DifferenceDone(night_id=f"sim{seed}", unit=unit, science_path=str(res.path), object=v["target"],
                            filter=v["filter"], path=str(prods["diff"]), noise_path=str(prods["noise"]),
                            mask_path=str(prods["mask"]), conv_path=str(prods["conv"]), reference_path=str(ref))
        figures = difference_products(ev, processed, scratch, params, transient_params(settings), Path(paths.path_refcat))
        out.append({"visit": v, "frames": fs, "stack": res, "event": ev, "figures": figures})
    return pj, out


def truth_psf_snr(diff: np.ndarray, noise: np.ndarray, mask: np.ndarray, x: np.ndarray, y: np.ndarray,
                  flux: np.ndarray, fwhm_px: float, beta: float, nrand: int = 1500, seed: int = 1
                  ) -> tuple[np.ndarray, float]:
    """S/N of injected point sources of known total ``flux`` (difference units) at 0-based
    (x, y) for PSF-optimal photometry on the difference: ``flux / err`` with
    ``err = scale / sqrt(sum P^2 / s^2)`` over the unmasked pixels within 2 FWHM (P the
    circular Moffat of ``fwhm_px``, ``beta``; s the noise image). ``scale`` is the robust
    scatter of ``sum(P D / s^2) / sum(P^2 / s^2) / err`` at ``nrand`` random unmasked places of
    the difference (the noise image's correlation, measured on the image itself, not taken
    from the pipeline).

    Returns the S/N array and ``scale``.
    """
    ny, nx = diff.shape
    half = int(np.ceil(2 * fwhm_px)) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    bad = (mask != 0) | ~np.isfinite(noise) | (noise <= 0) | ~np.isfinite(diff)

    def fit(xc, yc):
        i0, j0 = int(round(yc)), int(round(xc))
        if i0 - half < 0 or j0 - half < 0 or i0 + half >= ny or j0 + half >= nx:
            return np.nan, np.nan
        sl = (slice(i0 - half, i0 + half + 1), slice(j0 - half, j0 + half + 1))
        dx, dy = xx + j0 - xc, yy + i0 - yc
        r2 = dx**2 + dy**2
        p = (beta - 1.0) / (np.pi * alpha**2) * (1.0 + r2 / alpha**2) ** (-beta)
        use = (r2 <= (2 * fwhm_px) ** 2) & ~bad[sl]
        s = np.where(use, noise[sl], 1.0)
        a = float(np.sum(np.where(use, p * p / s**2, 0.0)))
        if a <= 0:
            return np.nan, np.nan
        b = float(np.sum(np.where(use, p * diff[sl] / s**2, 0.0)))
        return b / a, 1.0 / np.sqrt(a)

    rng = np.random.default_rng(seed)
    zs = []
    while len(zs) < nrand:
        xc, yc = rng.uniform(half, nx - half - 1), rng.uniform(half, ny - half - 1)
        if bad[int(round(yc)), int(round(xc))]:
            continue
        f, e = fit(xc, yc)
        if np.isfinite(f):
            zs.append(f / e)
    zs = np.asarray(zs)
    scale = float(1.4826 * np.median(np.abs(zs - np.median(zs))))
    snr = np.full(len(x), np.nan)
    for k, (xc, yc, fl) in enumerate(zip(x, y, flux, strict=True)):
        f, e = fit(xc, yc)
        snr[k] = fl / (e * scale) if np.isfinite(e) else np.nan
    return snr, scale


def evaluate_difference(entry: dict, truth_dir: Path, match_arcsec: float | None = None) -> dict:
    """Candidates of one difference of :func:`run_sim_night` against the simulator's truth.

    For each injected transient of the visit's target on the difference: its flux in the
    difference (science-stack units, from the true magnitudes and the stack's ``ZP_TOT``; the
    fading source: science minus reference flux), its S/N for PSF-optimal photometry from that
    flux and the difference's noise at its place (:func:`truth_psf_snr`, PSF of the image that
    was not convolved), whether a candidate lies within ``match_arcsec`` (``found``; default
    max(1.5", FWHM / 2) with FWHM that of the difference: 2.5 times the centroid error of an
    S/N-5 point source), whether any detection does (``detected``, to tell detection from
    vetting losses) and the label. The moving object is matched to its position at the
    visit's mean time.

    A candidate is false when it lies farther than 1.5 FWHM (and ``match_arcsec``) from every
    injected source (for the moving object: from its track over the visit); a candidate on
    the wing of an injected source whose core is masked is its light, not a false alarm.

    Returns ``{"rows": [...], "false": Table of false candidates, "area_px": unmasked pixels of
    the difference, "scale": noise scale, ...}``.
    """
    import json

    from astropy.table import Table
    from astropy.time import Time
    from astropy.wcs import WCS

    ev = entry["event"]
    diff = fits.getdata(ev.path).astype(np.float64)
    dh = fits.getheader(ev.path)
    noise = fits.getdata(ev.noise_path).astype(np.float64)
    mask = fits.getdata(ev.mask_path)
    sh = fits.getheader(ev.science_path)
    cat = Table.read(Path(ev.path).with_name(Path(ev.path).name[:-5] + ".transient.cat"), format="ascii.ecsv")
    wcs = WCS(dh, naxis=2)
    pixscale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600)
    filt = ev.filter
    zp = float(sh["ZP_TOT"])
    if str(dh.get("SUBCONV", "REFERENCE")).strip().upper() == "SCIENCE":
        rt = json.loads((truth_dir / "refs" / f"{Path(ev.reference_path).name[:-5]}.json").read_text())
        psf = rt["psf"] if isinstance(rt.get("psf"), dict) else {}
        fwhm_px = float(psf.get("fwhm_arcsec", rt.get("seeing_arcsec", 3.0))) / pixscale
        beta = float(psf.get("beta", 3.0))
    else:
        fwhm_px = float(sh["SEEING"]) / pixscale
        beta = float(sh.get("COGBETA", 3.5))
    if match_arcsec is None:
        match_arcsec = max(1.5, 0.5 * fwhm_px * pixscale)
    assoc_arcsec = max(match_arcsec, 1.5 * fwhm_px * pixscale)
    inj = json.loads((truth_dir / "transients.json").read_text())
    items = list(inj.values()) if isinstance(inj, dict) else list(inj)
    frames = {f.raw.name for f in entry["frames"]}
    tmid = np.mean([Time(f.header["DATE-OBS"], scale="utc").mjd + f.header["EXPTIME"] / 2 / 86400
                    for f in entry["frames"]])
    rows = []
    ny, nx = diff.shape
    for tr in items:
        if tr.get("target") != ev.object or filt not in tr.get("mag", {}):
            continue
        rows_f = [r for r in tr["frames"] if r["file"] in frames]
        if not rows_f:
            continue
        track = None
        if tr["kind"] == "moving":
            ts = np.array([Time(r["t_mid"], scale="utc").mjd for r in rows_f])
            if len(ts) > 1:
                pra = np.polyfit(ts - tmid, [r["ra"] for r in rows_f], 1)
                pde = np.polyfit(ts - tmid, [r["dec"] for r in rows_f], 1)
                ra, dec = float(np.polyval(pra, 0)), float(np.polyval(pde, 0))
                half = 0.5 * (ts.max() - ts.min()) + max(f.header["EXPTIME"] for f in entry["frames"]) / 2 / 86400
                track = [(float(np.polyval(pra, t)), float(np.polyval(pde, t))) for t in (-half, half)]
            else:
                ra, dec = rows_f[0]["ra"], rows_f[0]["dec"]
        else:
            ra, dec = tr["ra"], tr["dec"]
        x, y = wcs.all_world2pix(ra, dec, 0)
        if not (0 <= x <= nx - 1 and 0 <= y <= ny - 1):
            continue
        flux = 10 ** (-0.4 * (tr["mag"][filt] - zp))
        if tr["kind"] == "fading":
            flux -= 10 ** (-0.4 * (tr["mag_reference"][filt] - zp))
        rows.append({"id": tr["id"], "kind": tr["kind"], "ra": ra, "dec": dec, "x": float(x), "y": float(y),
                     "flux": float(flux), "mag": tr["mag"][filt], "track": track})
    snr, scale = truth_psf_snr(diff, noise, mask, np.array([r["x"] for r in rows]), np.array([r["y"] for r in rows]),
                               np.array([r["flux"] for r in rows]), fwhm_px, beta)
    cra = np.asarray(cat["ALPHA_J2000"], float)
    cdec = np.asarray(cat["DELTA_J2000"], float)
    cand = np.asarray(cat["candidate"], bool)
    used = np.zeros(len(cat), bool)

    def dist(ra0, dec0):
        return np.hypot((cra - ra0) * np.cos(np.radians(dec0)), cdec - dec0) * 3600

    for r, s in zip(rows, snr, strict=True):
        r["snr"] = float(abs(s))
        d = dist(r["ra"], r["dec"]) if len(cat) else np.zeros(0)
        near = d < (3 * match_arcsec if r["kind"] == "moving" else match_arcsec)
        r["detected"] = bool(near.any())
        r["found"] = bool((near & cand).any())
        k = int(np.flatnonzero(near & cand)[np.argmin(d[near & cand])]) if r["found"] else \
            (int(np.flatnonzero(near)[np.argmin(d[near])]) if r["detected"] else -1)
        r["row"] = k
        r["label"] = str(cat["label"][k]) if k >= 0 else ""
        used |= d < assoc_arcsec
        if r["track"] is not None and len(cat):
            for t in np.linspace(0, 1, 9):
                (a0, d0), (a1, d1) = r["track"]
                used |= dist(a0 + t * (a1 - a0), d0 + t * (d1 - d0)) < assoc_arcsec
        r["masked_frac"] = float(np.mean(mask[max(int(r["y"]) - 3, 0):int(r["y"]) + 4,
                                              max(int(r["x"]) - 3, 0):int(r["x"]) + 4] != 0))
    false = cat[cand & ~used]
    return {"rows": rows, "false": false, "cat": cat, "area_px": int(np.sum(mask == 0)), "scale": scale,
            "fwhm_px": fwhm_px, "shape": diff.shape, "subconv": str(dh.get("SUBCONV", "")),
            "match_arcsec": match_arcsec, "assoc_arcsec": assoc_arcsec}


def measure_nights(root: Path, seeds: list[int], n_transients: int = 16) -> dict:
    """Pooled transient figures of simulated nights (:func:`run_sim_night` then
    :func:`evaluate_difference`): recall at S/N >= 10 and 5 <= S/N < 10 (static and near-bright
    transients), false candidates (and per full-size 10200 x 6800 stack, by unmasked area),
    fading and moving objects found / labelled, failed subtractions."""
    out = {"hi": [0, 0], "mid": [0, 0], "false": 0, "area": 0, "failed": 0, "fading": [0, 0, 0],
           "moving": [0, 0, 0], "differences": 0}
    for seed in seeds:
        pj, runs = run_sim_night(Path(root) / f"seed{seed}", seed, n_transients=n_transients)
        for e in runs:
            if e["event"] is None:
                out["failed"] += 1
                continue
            ev = evaluate_difference(e, pj.parent / "truth")
            out["differences"] += 1
            out["false"] += len(ev["false"])
            out["area"] += ev["area_px"]
            for r in ev["rows"]:
                if r["kind"] in ("static", "near_bright"):
                    key = "hi" if r["snr"] >= 10 else "mid" if r["snr"] >= 5 else None
                    if key:
                        out[key][0] += int(r["found"])
                        out[key][1] += 1
                elif r["snr"] >= 10:
                    k = out[r["kind"]]
                    k[0] += 1
                    k[1] += int(r["found"])
                    k[2] += int(r["found"] and r["label"] == r["kind"])
    out["false_per_full_stack"] = out["false"] * 10200 * 6800 / max(out["area"], 1)
    return out


if __name__ == "__main__":     # python tests/conftest_phot.py OUTDIR SEED [SEED ...]
    import json
    import sys

    print(json.dumps(measure_nights(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]), indent=1))
