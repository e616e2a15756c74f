"""``simulate``: write a whole raw 7DT night, its reference data and its truth."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time, TimeDelta

from gppy import fitsio, naming
from gppy.sim import instrument as ins
from gppy.sim.catalog import StarField, inside_box, make_starfield
from gppy.sim.detector import BAND_ROWS, Detector, Exposure, Physics, make_detector, read_out
from gppy.sim.header import raw_header
from gppy.sim.optics import FrameWCS, PSFModel, distortion_coefficients, moffat_neff, offset_radec
from gppy.sim.plan import FrameSpec, Plan, make_plan
from gppy.sim.reference import REF_MAGZERO, gaia_table, reference_header, reference_image
from gppy.sim.render import cosmic_rays, line_strip, render_moffat

STACK_MARGIN = 1.07
MASK_CR, MASK_TRAIL, MASK_SATURATED, MASK_BADCOL, MASK_HOT = 1, 2, 4, 8, 16


@dataclass
class VisitConditions:
    dither_arcsec: tuple[float, float]
    pointing_error_arcsec: tuple[float, float]
    rotation_deg: float
    fwhm_arcsec: float
    beta: float
    transparency_mag: float
    sky_dmag: float


@dataclass
class FrameTruth:
    """Everything true about one science frame (also used to render it)."""

    spec: FrameSpec
    wcs: FrameWCS
    header_ra: float
    header_dec: float
    psf: PSFModel
    zp: float
    airmass: float
    sky_adu: float
    sky_gradient: tuple[float, float]
    transparency_mag: float
    bias_offset: float
    trail: dict | None = None
    extra: dict = field(default_factory=dict)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _unit_key(unit: str) -> int:
    return int.from_bytes(unit.encode()[:8].ljust(8, b"\0"), "little") % (2 ** 31)


def _epoch_year(t: Time) -> float:
    return float(t.jyear)


def simulate(outdir: str | Path, unit: str = "7DT01", night: str = "2025-01-15",
             size: tuple[int, int] = ins.SMALL_SIZE, full: bool = False, targets: int = 2,
             filters: Sequence[str] | None = None, seed: int = 0, calib: bool = True,
             transients: bool = True, *, archive_nights: Sequence[str] | None = None,
             star_density: float = 55000.0, physics: Physics | None = None, references: bool = True,
             extras: bool = True, n_transients: int = 8, distortion_arcsec: float = 1.0,
             max_pointing_error_arcmin: float = 4.0, max_rotation_deg: float = 1.5,
             trail_fraction: float = 0.15, cr_rate: float = 0.15, workers: int = 1,
             progress: Callable[[str], None] | None = None) -> Path:
    """Simulate one raw night of a 7DT unit with its reference data and truth.

    Parameters
    ----------
    outdir : path
        Root of the data tree: ``factory/`` (path_base), ``obsdata/``, ``truth/`` and
        ``path.json`` are written under it.
    unit, night : str
        Unit name (``7DT01``) and local date of the night (``YYYY-MM-DD``).
    size : (int, int)
        Frame size (NAXIS1, NAXIS2); ``full=True`` gives 9576 x 6388.
    targets : int
        Number of targets; with 2 or more the last is a named field, the others are tiles.
    filters : list of str
        Filters observed (default m425, m650, r); 3 frames of 100 s per target and filter.
    seed : int
        Everything is deterministic for a seed.
    calib : bool
        Write bias, dark and flat frames. Without them an archive of masters from earlier
        nights is written (``archive_nights``, by default 3 and 9 days before).
    transients : bool
        Inject transients (see the README for the kinds).
    archive_nights : list of str
        Earlier nights (``YYYY-MM-DD``) whose masters are written into the master archive.
    star_density : float
        Stars per square degree with 10 < G < 21.5 (real high-latitude fields have fewer).
    physics : Physics
        Switches for every effect.
    references : bool
        Write the reference catalogue and images.
    extras : bool
        Add a 3 x 300 s visit of the first target and a single 45 s frame of the last.
    distortion_arcsec : float
        Radial distortion at the frame corners (arcsec).
    cr_rate : float
        Cosmic rays per megapixel per second.
    workers : int
        Processes writing frames in parallel (fork); the output does not depend on it.

    Returns
    -------
    Path of the written ``path.json``.
    """
    t_begin = time.time()
    say = progress or (lambda _msg: None)
    physics = physics or Physics()
    if full:
        size = ins.FULL_SIZE
    nx, ny = int(size[0]), int(size[1])
    filters = list(filters or ins.DEFAULT_FILTERS)
    for f in filters:
        ins.get_filter(f)
    unit = naming.sanitize(unit, "UNIT")
    out = Path(outdir).resolve()
    base = out / "factory"
    night_dir = out / "obsdata" / unit / f"{night}_gain2750"
    truth_dir = out / "truth"
    for d in (base, night_dir, truth_dir / "frames", truth_dir / "calib", truth_dir / "refs"):
        d.mkdir(parents=True, exist_ok=True)
    stack_size = (int(round(nx * STACK_MARGIN)), int(round(ny * STACK_MARGIN)))

    plan = make_plan(unit, night, targets, filters, _rng(seed, 1), calib=calib, extras=extras)
    det = make_detector((ny, nx), seed=int(_rng(seed, 2, _unit_key(unit)).integers(2 ** 31)), physics=physics)
    geo_rng = _rng(seed, 3)
    pv1, pv2 = (distortion_coefficients((nx, ny), distortion_arcsec, 0.15 * distortion_arcsec, geo_rng)
                if physics.distortion else ({1: 1.0}, {1: 1.0}))

    # the sky of every target
    scale_deg = ins.PIXEL_SCALE / 3600.0
    hw = 0.5 * nx * scale_deg * 1.25 + 3.0 / 60
    hh = 0.5 * ny * scale_deg * 1.25 + 3.0 / 60
    fields: list[StarField] = []
    for k, tg in enumerate(plan.targets):
        fields.append(make_starfield(tg.ra, tg.dec, hw, hh, star_density, _rng(seed, 4, k),
                                     id_base=(k + 1) * 10 ** 15 + 4_000_000_000_000_000))
    visit_cond = _visit_conditions(plan, seed, physics, max_pointing_error_arcmin, max_rotation_deg, (nx, ny))
    truths: dict[int, FrameTruth] = {}
    for spec in plan.science():
        truths[spec.index] = _frame_truth(spec, plan, visit_cond[spec.visit], seed, physics, (nx, ny), pv1, pv2)
    trail_frames = _trail_frames(plan, seed, trail_fraction) if physics.satellite_trail else set()
    tr_list = (_make_transients(plan, fields, truths, seed, n_transients, (nx, ny))
               if (transients and physics.transients) else [])

    # raw frames, reference catalogues and images: independent random streams, so any order or
    # process gives the same bytes; the biggest jobs (reference images) go first
    ref_jobs = _reference_plan(plan, truths, tr_list, filters, seed, stack_size) if references else []
    night_mid = (Time(np.mean([t.spec.t_mid.mjd for t in truths.values()]), format="mjd", scale="utc")
                 if truths else Time(f"{night}T23:00:00", scale="utc"))
    global _JOB
    _JOB = {"plan": plan, "truths": truths, "fields": fields, "det": det, "tr_list": tr_list,
            "trail_frames": trail_frames, "seed": seed, "physics": physics, "cr_rate": cr_rate, "unit": unit,
            "night_dir": night_dir, "truth_dir": truth_dir, "say": say, "ref_jobs": ref_jobs, "out": out,
            "base": base, "night_mid": night_mid, "filters": filters}
    # every flat and the fixed mask once, before any fork (NumPy releases the GIL: threads)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, workers)) as ex:
        list(ex.map(lambda f: det.flat(f) if f else det.fixed_mask(), [*filters, None]))
    order = sorted(range(len(ref_jobs)), key=lambda n: -ref_jobs[n]["size"][0] * ref_jobs[n]["size"][1])
    jobs = ([("reference", n) for n in order] + [("catalogue", k) for k in range(len(plan.targets) if references else 0)]
            + [("calib_truth", n) for n in range(2 + len(filters))] + [("frame", spec.index) for spec in plan.frames])
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            results = pool.map(_job, jobs, chunksize=1)
    else:
        results = [_job(j) for j in jobs]
    _JOB = {}
    by_id = {t["id"]: t for t in tr_list}
    done: dict[tuple[str, int], object] = dict(zip(jobs, results, strict=True))
    for i in (spec.index for spec in plan.frames):
        for row in done[("frame", i)]:
            by_id[row["id"]]["frames"].append({k: v for k, v in row.items() if k != "id"})
    ref_info: dict[str, dict] = {}                  # per target: catalogues, then its images
    for k in range(len(plan.targets) if references else 0):
        ref_info.update(done[("catalogue", k)])
        for n, job in enumerate(ref_jobs):
            if job["target"] == k:
                name, info = done[("reference", n)]
                ref_info[name] = info

    # master archive
    if archive_nights is None and not calib:
        d = Time(f"{night}T12:00:00")
        archive_nights = [(d - TimeDelta(k, format="jd")).isot[:10] for k in (3, 9)]
    archive = write_master_archive(base / "master_frame_1x1_gain2750", unit, det, archive_nights or [],
                                   filters, seed) if archive_nights else []
    # sky grid
    _write_skygrid(base / "skygrid.fits", plan, seed)
    # path.json
    path_json = out / "path.json"
    cfg = {
        "_comment": "written by gppy simulate; every root is explicit (the v1 defaults derived from path_base)",
        "path_base": str(base),
        "path_obsdata": str(out / "obsdata"),
        "path_processed": str(out / "processed_1x1_gain2750"),
        "path_refcat": str(base / "ref_cat"),
        "path_ref_scamp": str(base / "ref_scamp"),
        "path_log": str(base / "log"),
        "ref_frame": str(base / "ref_frame"),
        "path_mframe": str(base / "master_frame_1x1_gain2750"),
        "path_scratch": str(base / "scratch"),
        "skygrid": str(base / "skygrid.fits"),
        "settings": {"stack_size": list(stack_size), "units": [unit]},
    }
    fitsio.write_text(path_json, json.dumps(cfg, indent=1))
    night_truth = {
        "unit": unit, "night": night, "seed": seed, "size": [nx, ny], "stack_size": list(stack_size),
        "night_dir": str(night_dir), "filters": filters, "physics": physics.__dict__,
        "star_density_per_deg2": star_density,
        "detector": det.to_dict(),
        "distortion": {"corner_arcsec": distortion_arcsec if physics.distortion else 0.0,
                       "pv1": {str(k): v for k, v in pv1.items()}, "pv2": {str(k): v for k, v in pv2.items()}},
        "targets": [{"name": t.name, "ra": t.ra, "dec": t.dec, "tile": t.is_tile} for t in plan.targets],
        "visits": [{"index": v.index, "target": plan.targets[v.target].name, "filter": v.filt,
                    "exptime": v.exptime, "frames": [plan.frames[i].filename(unit) for i in v.frames]}
                   for v in plan.visits],
        "frames": [{"file": f.filename(unit), "kind": f.kind, "object": f.obj, "filter": f.filt,
                    "exptime": f.exptime, "date_obs": f.t_start.isot} for f in plan.frames],
        "trail_frames": sorted(plan.frames[i].filename(unit) for i in trail_frames),
        "references": ref_info,
        "master_archive": [str(p) for p in archive],
        "conventions": {
            "pixels": "x_0based/y_0based: pixel centres at integers from 0; x_1based = x_0based + 1 (FITS, SExtractor)",
            "zp": "zp_adu: AB mag of a source giving 1 ADU in total in the whole exposure, in the "
                  "calibrated frame (raw - bias - dark) / flat with the true flat at median 1; "
                  "zp_adu_per_s = zp_adu - 2.5 log10(EXPTIME)",
            "sky_adu": "mean sky in the calibrated frame (ADU per pixel) at the frame centre",
            "epoch": "star ra/dec in truth CSVs are at the mid-exposure epoch; the Gaia CSV is at 2016.0",
        },
    }
    fitsio.write_text(truth_dir / "night.json", json.dumps(night_truth, indent=1))
    fitsio.write_text(truth_dir / "transients.json", json.dumps(tr_list, indent=1))
    say(f"night simulated in {time.time() - t_begin:.1f} s")
    return path_json


# ---------------------------------------------------------------------------------------- frames

_JOB: dict = {}


def _job(key: tuple[str, int]):
    """One job of the night (run in a worker process or in this one)."""
    kind, n = key
    if kind == "frame":
        return _frame_job(n)
    if kind == "reference":
        return _reference_job(n)
    if kind == "calib_truth":
        return _write_calib_truth(_JOB["truth_dir"] / "calib", _JOB["det"], _JOB["filters"], only=n)
    return _catalogue_job(n)


def _frame_job(index: int) -> list[dict]:
    """Write raw frame ``index`` and its truth files; return its transient rows."""
    c = _JOB
    plan, seed, unit = c["plan"], c["seed"], c["unit"]
    spec = plan.frames[index]
    t0 = time.time()
    name = spec.filename(unit)
    rows: list[dict] = []
    sci = spec.kind == "science"
    if sci:
        tr = c["truths"][spec.index]
        raw, frame_truth, mask, stars = _science_frame(spec, tr, c["fields"][spec.target], c["det"], c["tr_list"],
                                                       spec.index in c["trail_frames"], seed, c["physics"],
                                                       c["cr_rate"], unit)
        rows = frame_truth["transients"]
    else:
        raw, frame_truth, mask = _calibration_frame(spec, c["det"], seed, c["physics"], c["cr_rate"])
        stars = None
    tg = plan.targets[spec.target] if sci else None
    hdr = raw_header(unit=unit, kind=spec.kind, obj=spec.obj, filt=spec.filt, exptime=spec.exptime,
                     date_obs=spec.t_start, ra=tr.header_ra if sci else None, dec=tr.header_dec if sci else None,
                     obj_ra=tg.ra if sci else None, obj_dec=tg.dec if sci else None,
                     spelling=spec.spelling, seq=spec.index,
                     ccd_temp=ins.CCD_TEMP + float(_rng(seed, 9, spec.index).normal(0, 0.05)))
    fitsio.write_fits(c["night_dir"] / name, raw, hdr)
    stem = naming.stem(name)
    frames_dir = c["truth_dir"] / "frames"
    frame_truth["file"] = name
    frame_truth["header_date_obs"] = spec.t_start.isot
    fitsio.write_text(frames_dir / f"{stem}.json", json.dumps(frame_truth, indent=1))
    fitsio.write_fits(frames_dir / f"{stem}.mask.fits", None, fits.Header(),
                      extra_hdus=[fits.CompImageHDU(mask, compression_type="RICE_1", name="MASK")])
    if stars is not None:
        write_csv(stars, frames_dir / f"{stem}.stars.csv")
    c["say"](f"{name} ({time.time() - t0:.1f} s)")
    return rows


# ----------------------------------------------------------------------------------------- plan


def write_csv(table: Table, dest: Path) -> Path:
    """Write a table as CSV quickly (one format string per row), atomically; the same text as
    astropy's ``ascii.csv`` writer for the column formats used here (masked values are empty)."""
    fmts = []
    cols = []
    for name in table.colnames:
        col = table[name]
        fmt = col.info.format
        if col.dtype.kind in "iub":
            f = "%d"
        elif fmt:
            f = "%" + fmt.lstrip("{:").rstrip("}")
        else:
            f = "%.10g"
        mask = np.ma.getmaskarray(col) if getattr(col, "mask", None) is not None else None
        if mask is not None and mask.any():
            values = np.asarray(col.data if hasattr(col, "data") else col).tolist()
            cols.append(["" if m else f % v for v, m in zip(values, mask.tolist(), strict=True)])
            fmts.append("%s")
        else:
            cols.append(np.asarray(col).tolist())
            fmts.append(f)
    line = ",".join(fmts)
    body = "\n".join(line % row for row in zip(*cols, strict=True))
    return fitsio.write_text(dest, ",".join(table.colnames) + "\n" + body + ("\n" if len(table) else ""))


def _visit_conditions(plan: Plan, seed: int, ph: Physics, max_err_arcmin: float, max_rot: float,
                      size: tuple[int, int]) -> dict[int, VisitConditions]:
    out = {}
    nx, ny = size
    for v in plan.visits:
        r = _rng(seed, 5, v.index)
        dmax = 0.015 * min(nx, ny) * ins.PIXEL_SCALE
        dither = tuple(r.uniform(-dmax, dmax, 2))
        err_r = r.uniform(0.3, max_err_arcmin) * 60.0 if ph.pointing_error else 0.0
        err_a = r.uniform(0, 2 * np.pi)
        rot = r.uniform(-max_rot, max_rot) if ph.rotation else 0.0
        out[v.index] = VisitConditions((float(dither[0]), float(dither[1])),
                                       (float(err_r * np.cos(err_a)), float(err_r * np.sin(err_a))),
                                       float(rot), float(r.uniform(2.0, 3.4)), float(r.uniform(2.8, 4.2)),
                                       float(r.uniform(0.0, 0.08)), float(r.normal(0.0, 0.08)))
    return out


def _frame_truth(spec: FrameSpec, plan: Plan, vc: VisitConditions, seed: int, ph: Physics,
                 size: tuple[int, int], pv1: dict, pv2: dict) -> FrameTruth:
    from gppy.sim.header import airmass, alt_az

    nx, ny = size
    r = _rng(seed, 6, spec.index)
    tg = plan.targets[spec.target]
    jit = r.normal(0.0, 1.5, 2)
    ra_c, dec_c = offset_radec(tg.ra, tg.dec, vc.dither_arcsec[0] + jit[0], vc.dither_arcsec[1] + jit[1])
    rot = vc.rotation_deg + (r.normal(0.0, 0.003) if ph.rotation else 0.0)
    wcs = FrameWCS(ra_c, dec_c, ((nx + 1) / 2.0, (ny + 1) / 2.0), rot, ins.PIXEL_SCALE, dict(pv1), dict(pv2))
    perr = r.normal(0.0, 2.0, 2) if ph.pointing_error else np.zeros(2)
    hra, hdec = offset_radec(ra_c, dec_c, vc.pointing_error_arcsec[0] + perr[0],
                             vc.pointing_error_arcsec[1] + perr[1])
    if ph.seeing_variation:
        psf = PSFModel(vc.fwhm_arcsec * float(np.exp(r.normal(0.0, 0.05))), vc.beta, 0.12,
                       float(r.uniform(0.0, 0.05)), float(r.uniform(0, 180)), 0.06)
    else:
        psf = PSFModel(2.6, 3.5, 0.0, 0.0, 0.0, 0.0)
    alt, _ = alt_az(ra_c, dec_c, spec.t_mid)
    am = airmass(alt)
    filt = ins.get_filter(spec.filt)
    transp = max(0.0, vc.transparency_mag + float(r.normal(0.0, 0.01)))
    zp = ins.zp_adu(filt, spec.exptime, am, transp)
    sky = ins.sky_adu(filt, spec.exptime, am, vc.sky_dmag + float(r.normal(0.0, 0.02))) if ph.sky else 0.0
    grad = (float(r.normal(0.0, 0.01)), float(r.normal(0.0, 0.01))) if ph.sky else (0.0, 0.0)
    return FrameTruth(spec, wcs, hra, hdec, psf, zp, am, sky, grad, transp,
                      float(r.normal(0.0, 0.5)) if ph.bias_structure else 0.0)


def _trail_frames(plan: Plan, seed: int, fraction: float) -> set[int]:
    sci = plan.science()
    r = _rng(seed, 7)
    chosen = {s.index for s in sci if r.uniform() < fraction}
    if sci and not chosen:
        chosen.add(sci[min(1, len(sci) - 1)].index)
    return chosen


# ----------------------------------------------------------------------------------- transients


def _noise_e(tr: FrameTruth, det: Detector) -> float:
    """Per-pixel variance (e-^2) of the background of a frame."""
    return tr.sky_adu * det.gain + ins.DARK_CURRENT_E * tr.spec.exptime + det.read_noise_e ** 2


def _flux_for_snr(snr_visit: float, nframes: int, fwhm_px: float, beta: float, var_e: float) -> float:
    """Per-frame flux (e-) so that PSF-optimal photometry of ``nframes`` stacked frames gives
    ``snr_visit``."""
    s1 = snr_visit / math.sqrt(nframes)
    b = float(moffat_neff(fwhm_px, beta)) * var_e
    return 0.5 * (s1 * s1 + math.sqrt(s1 ** 4 + 4 * s1 * s1 * b))


def _snr(flux_e: float, fwhm_px: float, beta: float, var_e: float) -> float:
    b = float(moffat_neff(fwhm_px, beta)) * var_e
    return flux_e / math.sqrt(flux_e + b)


def _make_transients(plan: Plan, fields: list[StarField], truths: dict[int, FrameTruth], seed: int,
                     n_per_target: int, size: tuple[int, int]) -> list[dict]:
    """Transients of every target: static point sources with visit S/N 3..100 (some next to
    bright stars), one source that fades relative to the references and one moving object."""
    nx, ny = size
    out: list[dict] = []
    scale = ins.PIXEL_SCALE / 3600.0
    from gppy.sim.optics import tan_deproject

    det_var = {}
    for k, tg in enumerate(plan.targets):
        r = _rng(seed, 8, k)
        vis = [v for v in plan.visits if v.target == k]
        ref_frame = {}
        for v in vis:                       # the first normal visit of each filter sets the mags
            if v.filt not in ref_frame and len(v.frames) > 1:
                ref_frame[v.filt] = (truths[v.frames[0]], len(v.frames))
        for v in vis:
            if v.filt not in ref_frame:
                ref_frame[v.filt] = (truths[v.frames[0]], len(v.frames))
        box_x, box_y = 0.38 * nx * scale, 0.38 * ny * scale
        snrs = np.geomspace(3.0, 100.0, n_per_target) if n_per_target > 1 else np.array([20.0])
        f = fields[k]
        bright = np.flatnonzero((f.gmag > 11.0) & (f.gmag < 14.0) & inside_box(f, tg.ra, tg.dec, box_x, box_y))
        near = set(r.choice(n_per_target, size=min(3, n_per_target, bright.size), replace=False).tolist()) \
            if bright.size else set()
        for j, snr in enumerate(snrs):
            if j in near:
                host = int(r.choice(bright))
                sep = r.uniform(3.0, 8.0)
                ang = r.uniform(0, 2 * np.pi)
                ra, dec = offset_radec(float(f.ra[host]), float(f.dec[host]), sep * np.cos(ang), sep * np.sin(ang))
                kind, extra = "near_bright", {"bright_star_source_id": int(f.source_id[host]),
                                              "bright_star_gmag": float(f.gmag[host]),
                                              "separation_arcsec": float(sep)}
            else:
                for _ in range(200):       # away from stars brighter than G = 19.5 (5")
                    xi, eta = r.uniform(-box_x, box_x), r.uniform(-box_y, box_y)
                    rr, dd = tan_deproject(np.array([xi]), np.array([eta]), tg.ra, tg.dec)
                    ra, dec = float(rr[0]), float(dd[0])
                    if _clear_of_stars(f, ra, dec, 5.0, 19.5):
                        break
                kind, extra = "static", {}
            mags = {}
            for filt, (ft, nfr) in ref_frame.items():
                key = ft.spec.index
                if key not in det_var:
                    det_var[key] = ft.sky_adu * ins.EGAIN + ins.DARK_CURRENT_E * ft.spec.exptime + ins.READ_NOISE_E ** 2
                fe = _flux_for_snr(float(snr), nfr, ft.psf.fwhm_arcsec / ins.PIXEL_SCALE, ft.psf.beta, det_var[key])
                mags[filt] = float(ft.zp - 2.5 * np.log10(fe / ins.EGAIN))
            out.append({"id": f"TR{k:02d}{j:02d}", "target": tg.name, "kind": kind, "ra": ra, "dec": dec,
                        "mag": mags, "snr_visit_design": float(snr), **extra, "frames": []})
        if k == 0:
            xi, eta = r.uniform(-box_x, box_x), r.uniform(-box_y, box_y)
            rr, dd = tan_deproject(np.array([xi]), np.array([eta]), tg.ra, tg.dec)
            m_ref = {filt: 16.8 + float(r.uniform(-0.3, 0.3)) for filt in ref_frame}
            out.append({"id": f"TR{k:02d}FD", "target": tg.name, "kind": "fading", "ra": float(rr[0]),
                        "dec": float(dd[0]), "mag": {fl: m + 1.5 for fl, m in m_ref.items()},
                        "mag_reference": m_ref, "frames": []})
            # moving object: starts near the centre, 45"/h
            xi, eta = r.uniform(-0.2, 0.2) * box_x, r.uniform(-0.2, 0.2) * box_y
            rr, dd = tan_deproject(np.array([xi]), np.array([eta]), tg.ra, tg.dec)
            t_ref = min(truths[i].spec.t_start for v in vis for i in v.frames)
            mags = {}
            for filt, (ft, _nfr) in ref_frame.items():
                fe = _flux_for_snr(30.0, 1, ft.psf.fwhm_arcsec / ins.PIXEL_SCALE, ft.psf.beta,
                                   ft.sky_adu * ins.EGAIN + ins.READ_NOISE_E ** 2)
                mags[filt] = float(ft.zp - 2.5 * np.log10(fe / ins.EGAIN))
            out.append({"id": f"TR{k:02d}MV", "target": tg.name, "kind": "moving", "ra": float(rr[0]),
                        "dec": float(dd[0]), "t_ref": t_ref.isot, "rate_arcsec_per_hour": 45.0,
                        "pa_deg": float(r.uniform(0, 360)), "mag": mags, "snr_single_design": 30.0,
                        "frames": []})
    return out


def _clear_of_stars(f: StarField, ra: float, dec: float, radius_arcsec: float, gmax: float) -> bool:
    near = (np.abs(f.dec - dec) < radius_arcsec / 3600) & (f.gmag < gmax)
    d = np.hypot((f.ra[near] - ra) * np.cos(np.deg2rad(dec)), f.dec[near] - dec) * 3600
    return not np.any(d < radius_arcsec)


def _transient_position(tr: dict, t: Time) -> tuple[float, float]:
    if tr["kind"] != "moving":
        return tr["ra"], tr["dec"]
    dt_h = (t - Time(tr["t_ref"], scale="utc")).to_value("hour")
    d = tr["rate_arcsec_per_hour"] * dt_h
    pa = np.deg2rad(tr["pa_deg"])
    return offset_radec(tr["ra"], tr["dec"], d * np.sin(pa), d * np.cos(pa))


# ---------------------------------------------------------------------------------------- frames


def _science_frame(spec: FrameSpec, tr: FrameTruth, fld: StarField, det: Detector, transients: list[dict],
                   trail: bool, seed: int, ph: Physics, cr_rate: float, unit: str):
    ny, nx = det.shape
    size = (nx, ny)
    r = _rng(seed, 10, spec.index)
    # sky plane
    yy = (np.arange(ny, dtype=np.float32)[:, None] - (ny - 1) / 2) / ny
    xx = (np.arange(nx, dtype=np.float32)[None, :] - (nx - 1) / 2) / nx
    row = 1.0 + tr.sky_gradient[0] * xx
    col = tr.sky_gradient[1] * yy
    signal = np.empty((ny, nx), np.float32)       # sky * (1 + gx x + gy y), in bands of rows
    for r0 in range(0, ny, BAND_ROWS):
        band = signal[r0:r0 + BAND_ROWS]
        np.add(row, col[r0:r0 + BAND_ROWS], out=band)
        band *= np.float32(tr.sky_adu)
    # stars
    epoch = _epoch_year(spec.t_mid)
    ra, dec = fld.positions_at(epoch)
    x, y = tr.wcs.world_to_pixel(ra, dec)
    near = (x > -150) & (x < nx + 150) & (y > -150) & (y < ny + 150)
    mags = fld.mag(spec.filt)
    flux = 10 ** (-0.4 * (mags - tr.zp))
    fwhm, ell, theta = tr.psf.at(x, y, size)
    if not ph.saturation:
        from gppy.sim.optics import moffat_alpha
        peak = flux * (tr.psf.beta - 1) / (np.pi * moffat_alpha(fwhm, tr.psf.beta) ** 2)
        near &= peak * np.median(det.flat(spec.filt)) < 0.7 * (ins.ADC_MAX - ins.BIAS_LEVEL - tr.sky_adu)
    if ph.stars:
        render_moffat(signal, x[near], y[near], flux[near], fwhm[near], tr.psf.beta, ell[near], theta[near])
    # transients
    tr_rows = []
    for t in transients:
        if t["target"] != spec.obj or spec.filt not in t["mag"]:
            continue
        m = t["mag"][spec.filt]
        f_tot = 10 ** (-0.4 * (m - tr.zp))
        if t["kind"] == "moving":
            ts = [spec.t_start + TimeDelta(spec.exptime * (i + 0.5) / 5, format="sec") for i in range(5)]
            pos = [_transient_position(t, tt) for tt in ts]
            pra = np.array([p[0] for p in pos])
            pdec = np.array([p[1] for p in pos])
            fsub = np.full(5, f_tot / 5)
        else:
            pra, pdec = np.array([t["ra"]]), np.array([t["dec"]])
            fsub = np.array([f_tot])
        px, py = tr.wcs.world_to_pixel(pra, pdec)
        tf, te, tt_ = tr.psf.at(px, py, size)
        render_moffat(signal, px, py, fsub, tf, tr.psf.beta, te, tt_)
        mra, mdec = _transient_position(t, spec.t_mid)
        mx, my = tr.wcs.world_to_pixel(np.array([mra]), np.array([mdec]))
        row = {"file": spec.filename(unit), "t_mid": spec.t_mid.isot, "ra": mra, "dec": mdec,
               "x_0based": float(mx[0]), "y_0based": float(my[0]), "flux_adu": float(f_tot), "mag": m,
               "zp_adu": tr.zp,
               "snr_expected": _snr(f_tot * det.gain, float(tf.mean()), tr.psf.beta, _noise_e(tr, det)),
               "in_frame": bool(0 <= mx[0] <= nx - 1 and 0 <= my[0] <= ny - 1)}
        tr_rows.append(row | {"id": t["id"]})
    # satellite trail
    mask = np.zeros((ny, nx), np.uint8)
    if trail:
        ang = r.uniform(0, np.pi)
        cx, cy = r.uniform(0.3, 0.7) * nx, r.uniform(0.3, 0.7) * ny
        p0 = (float(cx), float(cy))
        p1 = (float(cx + np.cos(ang) * 100), float(cy + np.sin(ang) * 100))
        sigma_pix = math.sqrt(_noise_e(tr, det)) / det.gain
        amp = float(r.uniform(4.0, 15.0) * sigma_pix)
        fw = tr.psf.fwhm_arcsec / ins.PIXEL_SCALE
        thresh = 0.25 * sigma_pix
        lin, prof = line_strip((ny, nx), p0, p1, fw)      # the pixels within 10 sigma of the line
        prof *= np.float32(amp)
        signal.reshape(-1)[lin] += prof
        mask.reshape(-1)[lin[prof > thresh]] |= MASK_TRAIL
        tr.trail = {"point0_0based": p0, "point1_0based": p1, "angle_deg": float(np.rad2deg(ang)),
                    "peak_adu": amp, "fwhm_px": fw, "mask_threshold_adu": thresh,
                    "profile": "Gaussian across the line, constant along it, crossing the whole frame"}
    n_cr = int(r.poisson(cr_rate * nx * ny / 1e6 * spec.exptime)) if ph.cosmic_rays else 0
    cr_pix, cr_e = cosmic_rays((ny, nx), n_cr, r)
    exp = Exposure(spec.exptime, spec.filt, signal, cr_pix, cr_e, tr.bias_offset)
    raw = read_out(det, exp, _rng(seed, 11, spec.index))
    _fixed_masks(mask, det, raw, cr_pix)
    # truth tables
    sel = near & (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    ix = np.clip(np.rint(x[sel]).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y[sel]).astype(int), 0, ny - 1)
    stars = Table()
    stars["source_id"] = fld.source_id[sel]
    stars["ra"] = ra[sel]
    stars["dec"] = dec[sel]
    stars["x_0based"] = x[sel]
    stars["y_0based"] = y[sel]
    stars["x_1based"] = x[sel] + 1.0
    stars["y_1based"] = y[sel] + 1.0
    stars["flux_adu"] = flux[sel]
    stars["mag"] = mags[sel]
    stars["gmag"] = fld.gmag[sel]
    stars["fwhm_arcsec"] = fwhm[sel] * ins.PIXEL_SCALE
    stars["ellipticity"] = ell[sel]
    stars["saturated"] = (raw[iy, ix] >= ins.ADC_MAX).astype(np.int8)
    for c in ("ra", "dec"):
        stars[c].info.format = ".8f"
    for c in ("x_0based", "y_0based", "x_1based", "y_1based"):
        stars[c].info.format = ".4f"
    for c in ("flux_adu", "mag", "gmag", "fwhm_arcsec", "ellipticity"):
        stars[c].info.format = ".5g"
    fw_all = fwhm[sel] * ins.PIXEL_SCALE
    truth = {
        "kind": "science", "object": spec.obj, "filter": spec.filt, "exptime": spec.exptime,
        "t_mid": spec.t_mid.isot, "epoch_jyear": epoch,
        "wcs_header": tr.wcs.header().tostring(sep="\n"),
        "crval": [tr.wcs.ra0, tr.wcs.dec0], "rotation_deg": tr.wcs.rotation_deg,
        "header_radec": [tr.header_ra, tr.header_dec],
        "pointing_offset_arcsec": _offset_arcsec(tr.header_ra, tr.header_dec, tr.wcs.ra0, tr.wcs.dec0),
        "zp_adu": tr.zp, "zp_adu_per_s": tr.zp - 2.5 * math.log10(spec.exptime),
        "airmass": tr.airmass, "transparency_loss_mag": tr.transparency_mag,
        "fwhm_center_arcsec": tr.psf.fwhm_arcsec, "fwhm_median_arcsec": float(np.median(fw_all)) if fw_all.size else None,
        "psf": tr.psf.to_dict(),
        "sky_adu": tr.sky_adu, "sky_gradient_per_frame": list(tr.sky_gradient),
        "sky_model": "sky_adu * (1 + gx * (x - cx)/NAXIS1 + gy * (y - cy)/NAXIS2), 0-based pixels, c = centre",
        "gain_e_per_adu": det.gain, "read_noise_adu": det.read_noise_adu, "read_noise_e": det.read_noise_e,
        "bias_offset_adu": tr.bias_offset, "n_cosmic_rays": n_cr, "trail": tr.trail,
        "n_stars_in_frame": int(sel.sum()), "n_saturated_stars": int(stars["saturated"].sum()),
        "transients": tr_rows,
        "mask_bits": {"cosmic_ray": MASK_CR, "trail": MASK_TRAIL, "saturated": MASK_SATURATED,
                      "bad_column": MASK_BADCOL, "hot_pixel": MASK_HOT},
    }
    return raw, truth, mask, stars


def _offset_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> list[float]:
    from gppy.sim.optics import tan_project
    xi, eta = tan_project(np.array([ra1]), np.array([dec1]), ra2, dec2)
    return [float(xi[0] * 3600), float(eta[0] * 3600)]


def _fixed_masks(mask: np.ndarray, det: Detector, raw: np.ndarray, cr_pix: np.ndarray) -> None:
    if cr_pix.size:
        mask.reshape(-1)[cr_pix] |= MASK_CR
    fixed = det.fixed_mask()                       # bad columns (8) and hot pixels (16)
    for r0 in range(0, mask.shape[0], BAND_ROWS):
        m = mask[r0:r0 + BAND_ROWS]
        m |= fixed[r0:r0 + BAND_ROWS]
        m |= (raw[r0:r0 + BAND_ROWS] >= ins.ADC_MAX).view(np.uint8) * np.uint8(MASK_SATURATED)


def _calibration_frame(spec: FrameSpec, det: Detector, seed: int, ph: Physics, cr_rate: float):
    ny, nx = det.shape
    r = _rng(seed, 10, spec.index)
    offset = float(r.normal(0.0, 0.5)) if ph.bias_structure else 0.0
    level = None
    signal = None
    if spec.kind == "flat":
        level = float(25000.0 * np.exp(r.normal(0.0, 0.03)))
        signal = np.float32(level)                 # uniform illumination (read_out takes a scalar)
    n_cr = int(r.poisson(cr_rate * nx * ny / 1e6 * spec.exptime)) if (ph.cosmic_rays and spec.exptime > 0) else 0
    cr_pix, cr_e = cosmic_rays((ny, nx), n_cr, r)
    exp = Exposure(spec.exptime, spec.filt if spec.kind == "flat" else None, signal, cr_pix, cr_e, offset)
    raw = read_out(det, exp, _rng(seed, 11, spec.index))
    mask = np.zeros((ny, nx), np.uint8)
    _fixed_masks(mask, det, raw, cr_pix)
    truth = {"kind": spec.kind, "object": spec.obj, "filter": spec.filt, "exptime": spec.exptime,
             "bias_offset_adu": offset, "flat_level_adu": level, "n_cosmic_rays": n_cr,
             "gain_e_per_adu": det.gain, "read_noise_adu": det.read_noise_adu, "read_noise_e": det.read_noise_e,
             "mask_bits": {"cosmic_ray": MASK_CR, "saturated": MASK_SATURATED, "bad_column": MASK_BADCOL,
                           "hot_pixel": MASK_HOT}}
    return raw, truth, mask


# ---------------------------------------------------------------------------------- calib truth


def _write_calib_truth(d: Path, det: Detector, filters: list[str], only: int | None = None) -> None:
    """``bias.fits``, ``dark_current.fits`` and ``flat_<FILT>.fits`` (all, or number ``only``)."""
    items = ["bias", "dark", *filters]
    for n, what in enumerate(items):
        if only is not None and n != only:
            continue
        h = fits.Header()
        if what == "bias":
            h["BUNIT"] = "ADU"
            h["COMMENT"] = "true bias (noiseless; each frame adds bias_offset_adu from its truth JSON)"
            fitsio.write_fits(d / "bias.fits", det.bias.astype(np.float32), h)
        elif what == "dark":
            h["BUNIT"] = "e-/s"
            h["EGAIN"] = det.gain
            h["COMMENT"] = "true dark current incl. hot pixels and hot columns; ADU = value * t / EGAIN"
            fitsio.write_fits(d / "dark_current.fits", det.dark.astype(np.float32), h)
        else:
            h["FILTER"] = what
            h["COMMENT"] = "true response (vignetting x dust x PRNU x dead columns), median 1"
            fitsio.write_fits(d / f"flat_{what}.fits", det.flat(what), h)


# ---------------------------------------------------------------------------------- references


def _reference_plan(plan: Plan, truths: dict[int, FrameTruth], tr_list: list[dict], filters: list[str],
                    seed: int, stack_size: tuple[int, int]) -> list[dict]:
    """Everything about each reference image except its pixels (cheap, in the parent): which
    target and filter, pixel grid, PSF, depth, sources present only in the reference. Each
    image is then rendered by :func:`_reference_job` with its own random stream, so the images
    can be made in any order and process."""
    from gppy.sim.optics import FrameWCS as _W

    jobs: list[dict] = []
    for k, tg in enumerate(plan.targets):
        r = _rng(seed, 15, k)
        fading = [(t["ra"], t["dec"], t["mag_reference"]) for t in tr_list
                  if t["kind"] == "fading" and t["target"] == tg.name]
        used = sorted({v.filt for v in plan.visits if v.target == k}, key=filters.index)
        for j, filt in enumerate(used):
            # visit depth: the first visit of this filter
            v = next(v for v in plan.visits if v.target == k and v.filt == filt)
            ft = truths[v.frames[0]]
            var_e = _noise_e_simple(ft)
            f5 = _flux_for_snr(5.0, 3, ft.psf.fwhm_arcsec / ins.PIXEL_SCALE, ft.psf.beta, var_e)
            depth_visit = ft.zp - 2.5 * math.log10(f5 / ins.EGAIN)
            sharp = (k + j) % 2 == 0
            psf = PSFModel(float(r.uniform(1.2, 1.6) if sharp else r.uniform(3.6, 4.4)),
                           float(r.uniform(4.0, 6.0) if sharp else r.uniform(2.3, 2.8)), 0.05,
                           float(r.uniform(0, 0.04)), float(r.uniform(0, 180)), 0.02)
            scale = 0.25
            rot = float(r.uniform(3.0, 12.0) * r.choice([-1, 1]))
            shift = r.uniform(-20, 20, 2)                       # arcsec, centre offset from the tile
            c, sn = abs(math.cos(math.radians(rot))), abs(math.sin(math.radians(rot)))
            sw, sh = stack_size[0] * ins.PIXEL_SCALE, stack_size[1] * ins.PIXEL_SCALE
            # the rotated footprint of the stack, the centre offset, and a 4 % margin
            rw = int(math.ceil(((sw * c + sh * sn) * 1.04 + 2 * np.hypot(*shift)) / scale))
            rh = int(math.ceil(((sh * c + sw * sn) * 1.04 + 2 * np.hypot(*shift)) / scale))
            cra, cdec = offset_radec(tg.ra, tg.dec, *shift)
            extra = [(fr, fd, fm[filt]) for fr, fd, fm in fading if filt in fm]
            jobs.append({"kind": "PS1", "target": k, "index": j, "filt": filt,
                         "name": f"ref_PS1_{tg.name}_00000000_000000_{filt}_0.fits",
                         "wcs": _W(cra, cdec, ((rw + 1) / 2.0, (rh + 1) / 2.0), rot, scale), "size": (rw, rh),
                         "epoch": 2013.0, "psf": psf, "depth": depth_visit + 1.5, "extra": extra,
                         "gap": k == 0 and j == 0, "magzero": REF_MAGZERO, "sharp": sharp})
            if k == 0:
                # a 7DT reference exactly on the tile grid
                w7 = _W(tg.ra, tg.dec, ((stack_size[0] + 1) / 2.0, (stack_size[1] + 1) / 2.0), 0.0, ins.PIXEL_SCALE)
                psf7 = PSFModel(float(r.uniform(2.0, 2.6)), 3.5, 0.05, 0.02, 0.0, 0.02)
                zp7 = ft.zp - 2.5 * math.log10(ft.spec.exptime) + 2.5 * math.log10(2100.0)
                jobs.append({"kind": "7DT", "target": k, "index": j, "filt": filt,
                             "name": f"ref_7DT_{tg.name}_20241117_190933_{filt}_2100.com.fits",
                             "wcs": w7, "size": stack_size, "epoch": 2024.88, "psf": psf7,
                             "depth": depth_visit + 1.2, "extra": extra, "gap": False, "magzero": zp7})
    return jobs


def _reference_job(n: int) -> tuple[str, dict]:
    """Render and write reference image ``n`` of the plan and its truth JSON."""
    c = _JOB
    job = c["ref_jobs"][n]
    t0 = time.time()
    k, filt = job["target"], job["filt"]
    tg = c["plan"].targets[k]
    r = _rng(c["seed"], 16 if job["kind"] == "PS1" else 17, k, job["index"])
    dest = c["base"] / "ref_frame" / filt / job["name"]
    data, weight, rinfo = reference_image(c["fields"][k], job["wcs"], job["size"], filt, job["epoch"], job["psf"],
                                          job["depth"], r, job["extra"], gap=job["gap"], magzero=job["magzero"],
                                          with_weight=job["kind"] == "7DT")
    if job["kind"] == "PS1":
        hdr = reference_header(job["wcs"], rinfo, tg.name, filt, "PS1-like (simulated)")
        fitsio.write_fits(dest, data, hdr)
        rinfo["sharper_than_science"] = job["sharp"]
    else:
        hdr = reference_header(job["wcs"], rinfo, tg.name, filt, "7DT deep stack (simulated)", exptime=2100.0)
        hdr["EGAIN"] = (ins.EGAIN * 21 * 2 / 3, "[e-/ADU] effective gain of the stack")
        rinfo["egain_e_per_count"] = hdr["EGAIN"]
        fitsio.write_fits(dest, data, hdr)
        fitsio.write_fits(naming.weight_of(dest), weight, hdr)
    rinfo["fading_sources"] = job["extra"]
    fitsio.write_text(c["out"] / "truth" / "refs" / f"{naming.stem(job['name'])}.json", json.dumps(rinfo, indent=1))
    c["say"](f"{job['name']} ({time.time() - t0:.1f} s)")
    return job["name"], rinfo


def _catalogue_job(k: int) -> dict[str, dict]:
    """The Gaia-XP-like CSV of target ``k`` and its SCAMP reference; their entries for night.json."""
    c = _JOB
    tg = c["plan"].targets[k]
    tab = gaia_table(c["fields"][k], _rng(c["seed"], 12, k))
    p = c["base"] / "ref_cat" / f"gaiaxp_dr3_synphot_{tg.name}.csv"
    write_csv(tab, p)
    info = {p.name: {"kind": "gaiaxp_csv", "rows": len(tab), "epoch": 2016.0}}
    scamp = _write_scamp(p, c["night_mid"], c["base"] / "ref_scamp" / f"{tg.name}.fits")
    if scamp:
        info[scamp.name] = {"kind": "scamp_reference", "obstime": c["night_mid"].isot}
    c["say"](p.name)
    return info


def _noise_e_simple(ft: FrameTruth) -> float:
    return ft.sky_adu * ins.EGAIN + ins.DARK_CURRENT_E * ft.spec.exptime + ins.READ_NOISE_E ** 2


def _write_scamp(csv: Path, obstime: Time, dest: Path) -> Path | None:
    """The SCAMP reference (positions at the night's epoch) through gppy.refcat, if present."""
    try:
        from gppy import refcat
    except ImportError:
        return None
    if not hasattr(refcat, "write_scamp_reference"):
        return None
    return Path(refcat.write_scamp_reference(refcat.load_gaiaxp(csv), obstime, dest))


# ------------------------------------------------------------------------------------- archive


def write_master_archive(mframe: Path, unit: str, det: Detector, nights: Sequence[str], filters: Sequence[str],
                         seed: int, dark_exptimes: Sequence[float] = (100.0, 300.0), n_combined: int = 9) -> list[Path]:
    """Masters of earlier nights, as the calibration stage would have archived them.

    Bias: true bias + a per-night level offset + read noise / sqrt(n_combined).
    Dark: bias-subtracted, ``dark_current * t / gain`` + noise. Flat: the true response
    (median 1) with Poisson noise of ``n_combined`` flats at 25000 ADU.
    """
    out: list[Path] = []
    for i, night in enumerate(nights):
        r = _rng(seed, 13, i)
        t = Time(f"{night}T23:00:00", scale="utc")
        ymd = t.strftime("%Y%m%d")
        noise = det.read_noise_adu / math.sqrt(n_combined)
        h = fits.Header()
        h["IMAGETYP"] = "Bias"
        h["DATE-OBS"] = t.isot
        h["NCOMBINE"] = n_combined
        h["EXPTIME"] = 0.0
        bias = det.bias + np.float32(r.normal(0, 0.5)) + r.standard_normal(det.shape, dtype=np.float32) * np.float32(noise)
        out.append(fitsio.write_fits(naming.master_zero(mframe, unit, ymd), bias.astype(np.float32), h))
        for e in dark_exptimes:
            h = fits.Header()
            h["IMAGETYP"] = "Dark"
            h["DATE-OBS"] = t.isot
            h["EXPTIME"] = float(e)
            h["NCOMBINE"] = n_combined
            dk = det.dark * e / det.gain
            dk = dk + (r.standard_normal(det.shape, dtype=np.float32)
                       * np.sqrt(dk / np.float32(det.gain) + np.float32(det.read_noise_adu ** 2 * 2))
                       / np.float32(math.sqrt(n_combined)))
            out.append(fitsio.write_fits(naming.master_dark(mframe, unit, e, ymd), dk.astype(np.float32), h))
        for f in filters:
            h = fits.Header()
            h["IMAGETYP"] = "Flat"
            h["DATE-OBS"] = t.isot
            h["FILTER"] = f
            h["NCOMBINE"] = n_combined
            fl = det.flat(f)
            fl = fl * (1 + r.standard_normal(det.shape, dtype=np.float32)
                       / np.float32(math.sqrt(25000 * det.gain * n_combined)))
            fl = fl / np.median(fl)
            out.append(fitsio.write_fits(naming.master_flat(mframe, unit, f, ymd), fl.astype(np.float32), h))
    return out


# -------------------------------------------------------------------------------------- skygrid


def _write_skygrid(dest: Path, plan: Plan, seed: int) -> None:
    """A sky grid in the 7DS format holding the simulated tiles (and their neighbours)."""
    ids, ras, decs, names = [], [], [], []
    tiles = [tg for tg in plan.targets if tg.is_tile]
    steps = [(0, 0, 0)] + [(d, dra, ddec) for d, dra, ddec in ((-1, -1.3, 0), (1, 1.3, 0), (-100, 0, -0.86),
                                                                (100, 0, 0.86))]
    taken = {tg.tile_id for tg in tiles}
    for tg in tiles:
        for did, dra, ddec in steps:
            tid = tg.tile_id + did
            if (did and tid in taken) or tid in ids or not 0 <= tid <= 99999:
                continue
            ra = (tg.ra + dra / math.cos(math.radians(tg.dec))) % 360.0
            ids.append(tid)
            ras.append(ra)
            decs.append(tg.dec + ddec)
            names.append(f"T{tid:05d}")
    order = np.argsort(ids)
    cols = [fits.Column("id", "K", array=np.array(ids, np.int64)[order]),
            fits.Column("ra", "D", array=np.array(ras)[order]),
            fits.Column("dec", "D", array=np.array(decs)[order]),
            fits.Column("tile", "6A", array=np.array(names)[order])]
    tab = fits.BinTableHDU.from_columns(cols)
    fitsio.write_fits(dest, None, fits.Header(), extra_hdus=[tab])
