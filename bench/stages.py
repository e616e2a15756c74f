"""Per-stage benchmarks of the harness, each with its peer run in the same process.

Every stage has ``run_<stage>(size, repeat, workdir, opts) -> dict`` (``size`` is the frame
size ``(NAXIS1, NAXIS2)``; stacks and differences use the stack grid that goes with it). The
data are made by the stage's own bench script generators (``bench/bench_*.py``) and cached
under ``workdir`` (a ``ready.json`` marker with the generator parameters); products of the timed
runs go to scratch folders under ``workdir`` and are removed between runs where a stage would
otherwise re-use them.

Returned dictionary: ``series`` (one summary per measurement: median/min/max seconds of the
repeats, peak RSS of the process and of the process tree, load average around the runs),
``steps`` (median seconds of each step reported by the stage itself), ``targets`` (the issue's
acceptance figure, the measured value, pass/fail), ``info`` and ``notes``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

from .measure import Series, median_steps, timed

FULL = (9576, 6388)
FULL_GRID = (10200, 6800)


def grid_for(size: tuple[int, int]) -> tuple[int, int]:
    """Stack grid that goes with a frame size (10200 x 6800 for the full 9576 x 6388)."""
    if tuple(size) == FULL:
        return FULL_GRID
    return (int(round(size[0] * FULL_GRID[0] / FULL[0])), int(round(size[1] * FULL_GRID[1] / FULL[1])))


def cached(folder: Path, params: dict, make: Callable[[Path], dict]) -> tuple[dict, float | None]:
    """``make(folder)`` once per ``params``; returns its (JSON-able) result and the seconds it
    took (None when the cached data were used)."""
    folder = Path(folder)
    marker = folder / "ready.json"
    if marker.exists():
        m = json.loads(marker.read_text())
        if m.get("params") == params:
            return m["data"], None
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    data = make(folder)
    dt = time.perf_counter() - t0
    marker.write_text(json.dumps({"params": params, "data": data, "generate_s": round(dt, 1)}, indent=1))
    return data, dt


def target(what: str, goal: str, value: str, ok: bool | None) -> dict:
    return {"what": what, "target": goal, "value": value, "pass": ok}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------------------------
# calibration: master of 9 (vs ccdproc.combine), reduction of one frame (vs plain astropy/NumPy)
# --------------------------------------------------------------------------------------------

def run_calib(size, repeat, workdir: Path, opts: dict) -> dict:
    from bench import bench_calib
    from gppy.config import PathConfig, Settings
    from gppy.fitsio import read_header
    from gppy.tables import load_changehdr
    from gppy.xp import backend_name, get_xp
    from gppy_calib.headers import describe
    from gppy_calib.masters import ClipRule, make_bias
    from gppy_calib.night import Job, MasterRef, NightCalibrator
    from gppy_calib.rawio import RawImage, read_master, write_master

    nx, ny = size
    nframes = int(opts.get("nframes", 9))

    def make(folder: Path) -> dict:
        d = bench_calib.make_data(folder, (ny, nx), nframes)
        return {"biases": [str(p) for p in d["biases"]], "masters": {k: str(v) for k, v in d["masters"].items()},
                "science": str(d["science"]), "mframe": str(d["mframe"])}

    data, gen_s = cached(workdir / "calib", {"size": [nx, ny], "nframes": nframes, "v": 1}, make)
    if opts.get("generate_only"):
        return {"generated_s": gen_s}
    biases = [Path(p) for p in data["biases"]]
    xp_name = opts.get("gpu", "off")
    xp = get_xp(xp_name)
    rules = load_changehdr()
    out = _fresh(workdir / "calib-out")

    # --- master of N: ours and ccdproc, alternating
    def ours_master():
        infos = [describe(str(p), read_header(p), rules) for p in biases]
        sources = [RawImage(p, f.header) for p, f in zip(biases, infos, strict=True)]
        m = make_bias(infos, sources, xp, ClipRule(3.0, 5, 512))
        write_master(out / "zero_gppy.fits", m.data, m.error, m.header)

    def ccdproc_master():
        import ccdproc

        comb = ccdproc.combine([str(p) for p in biases], method="median", sigma_clip=True,
                               sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                               sigma_clip_func=np.ma.mean, sigma_clip_dev_func=np.ma.std,
                               unit="adu", dtype=np.float32, mem_limit=16e9)
        fits.PrimaryHDU(np.asarray(comb.data, dtype=np.float32)).writeto(out / "zero_ccdproc.fits", overwrite=True)

    s_ours = Series(f"master of {nframes} bias frames: gppy_calib (read in row bands, 3-sigma clip, median, "
                    f"error image, write)", "ours")
    s_peer = Series(f"master of {nframes}: ccdproc.combine (median, sigma_clip 3/3 about mean/std, write)", "peer")
    for _ in range(repeat):
        s_ours.add(timed(ours_master)[0])
        s_peer.add(timed(ccdproc_master)[0])
    a = fits.getdata(out / "zero_gppy.fits").astype(np.float32)
    b = fits.getdata(out / "zero_ccdproc.fits").astype(np.float32)
    max_diff = float(np.nanmax(np.abs(a - b)))
    del a, b

    # --- reduction of one science frame, incl. reading the raw and writing every output
    work = Path(data["science"]).parents[1]
    m = {k: Path(v) for k, v in data["masters"].items()}
    info = describe(data["science"], read_header(data["science"]), rules)
    variants = [(False, False, "no cosmic rays, no trails"), (True, False, "cosmic rays"),
                (True, True, "cosmic rays + trails (default settings)")]
    series, steps, counts = [], {}, {}
    for cr, tr, label in variants:
        paths = PathConfig(path_base=work / "factory", path_processed=out / "processed", path_mframe=Path(data["mframe"]))
        cal = NightCalibrator(Settings(gpu=xp_name, cosmic_rays=cr, satellite_trails=tr), paths, "7DT01", xp)
        job = Job(info, out / "processed" / "science_calib.fits", "v1",
                  MasterRef("bias", m["bias"], "20250115"), MasterRef("dark", m["dark"], "20250115", exptime=100.0),
                  MasterRef("flat", m["flat"], "20250115", filter="m425"))
        cold = Series(f"reduce one frame, masters read too (cold), {label}", "info")
        run, prod = timed(lambda cal=cal, job=job: cal.reduce(job))
        cold.add(run)
        warm = Series(f"reduce one frame (raw read, calibrate, mask, weight, write 3 files), {label}", "ours")
        for _ in range(repeat):
            run, prod = timed(lambda cal=cal, job=job: cal.reduce(job))
            warm.add(run)
        counts[label] = {"cosmic_ray_pixels": int(getattr(prod, "ncr", -1)), "trails": int(getattr(prod, "ntrail", -1))}
        series += [warm, cold]
        del cal

    mst = {k: read_master(m[k]) for k in ("bias", "dark", "flat")}
    t_dark = float(mst["dark"][2].get("EXPTIME", 100.0))

    def plain_reduce():
        with fits.open(data["science"], memmap=False) as h:
            raw = h[0].data.astype(np.float32)
            hdr = h[0].header.copy()
        t = float(hdr["EXPTIME"])
        img = (raw - mst["bias"][0] - mst["dark"][0] * np.float32(t / t_dark)) / mst["flat"][0]
        fits.PrimaryHDU(img, hdr).writeto(out / "science_plain.fits", overwrite=True)

    peer = Series("plain astropy + NumPy reduction: read raw, (raw - bias - dark*t/t_dark)/flat, write image only "
                  "(masters in memory)", "peer")
    for _ in range(repeat):
        peer.add(timed(plain_reduce)[0])
    # check: the two reductions agree (same masters, same formula)
    ours_img = fits.getdata(out / "processed" / "science_calib.fits").astype(np.float32)
    plain_img = fits.getdata(out / "science_plain.fits").astype(np.float32)
    good = np.isfinite(ours_img) & np.isfinite(plain_img)
    rel = float(np.median(np.abs(ours_img[good] - plain_img[good])) / max(1e-6, float(np.median(np.abs(plain_img[good])))))
    del ours_img, plain_img
    mst.clear()
    series.append(peer)
    shutil.rmtree(out, ignore_errors=True)

    so, sp = s_ours.summary(), s_peer.summary()
    default = series[4].summary()
    ratio = sp["median_s"] / so["median_s"]
    return {
        "series": [so, sp] + [s.summary() for s in series],
        "steps": steps,
        "targets": [
            target(f"master of {nframes} frames", "< 3 s", f"{so['median_s']:.2f} s", so["median_s"] < 3.0),
            target(f"master of {nframes} vs ccdproc.combine", ">= 10x faster", f"{ratio:.1f}x", ratio >= 10.0),
            target("reduction of one frame incl. I/O (default: CR + trails)", "< 1.5 s",
                   f"{default['median_s']:.2f} s", default["median_s"] < 1.5),
        ],
        "ratios": {"ccdproc / ours (master)": ratio,
                   "ours (default) / plain reduction": default["median_s"] / series[-1].summary()["median_s"]},
        "info": {"backend": backend_name(xp), "frames": nframes, "generate_s": gen_s,
                 "master max |gppy - ccdproc| (ADU)": max_diff,
                 "reduced image: median |ours - plain| / median |plain|": rel, "detections": counts},
        "notes": ["The plain reduction writes one float32 image; the stage also computes and writes the "
                  "bitmask and the inverse-variance weight map, and (by default) finds cosmic rays "
                  "(astroscrappy) and satellite trails."],
    }


# --------------------------------------------------------------------------------------------
# astrometry: SExtractor + coarse match + SCAMP + header (vs SCAMP doing its own matching)
# --------------------------------------------------------------------------------------------

def run_astrometry(size, repeat, workdir: Path, opts: dict) -> dict:
    from astropy.table import Table

    from bench import bench_astrometry as ba
    from gppy.config import PathConfig, Settings
    from gppy.sim import simulate
    from gppy_astrometry.service import options_from, process_frame

    nx, ny = size
    nframes = int(opts.get("astrometry_frames", 3))

    def make(folder: Path) -> dict:
        cfg = simulate(folder, size=(nx, ny), targets=1, filters=["m625"], calib=False, transients=False,
                       references=True, extras=False, seed=3, max_pointing_error_arcmin=5.0, max_rotation_deg=2.0,
                       workers=int(opts.get("workers", 2)))
        paths = PathConfig.load(cfg)
        raws = sorted((folder / "obsdata").rglob("*.fits"))[:nframes]
        frames = []
        pristine = folder / "pristine"
        pristine.mkdir()
        for raw in raws:
            path, w, mk, stars, truth = ba.calibrate(folder, raw, paths.path_processed)
            stars.write(pristine / f"{path.stem}.stars.ecsv", overwrite=True)
            shutil.copy2(path, pristine / path.name)
            h = fits.getheader(path)
            frames.append({"image": str(path), "weight": str(w), "mask": str(mk), "obj": h["OBJECT"].strip(),
                           "date_obs": h["DATE-OBS"], "pristine": str(pristine / path.name),
                           "stars": str(pristine / f"{path.stem}.stars.ecsv"),
                           "offset_arcmin": float(np.hypot(*truth["pointing_offset_arcsec"])) / 60,
                           "rotation_deg": truth["rotation_deg"]})
        return {"config": str(cfg), "frames": frames}

    data, gen_s = cached(workdir / "astrometry", {"size": [nx, ny], "frames": nframes, "v": 1}, make)
    if opts.get("generate_only"):
        return {"generated_s": gen_s}
    paths = PathConfig.load(data["config"])
    settings = Settings()
    frames = data["frames"]

    def solve(f: dict, matcher: str):
        shutil.copy2(f["pristine"], f["image"])
        holder = {}

        def call():
            holder["res"] = process_frame(f["image"], f["weight"], f["mask"], f["obj"], f["date_obs"], "7DT01",
                                          "7DT01_2025-01-15_gain2750", paths, options_from(settings, matcher=matcher))
        run, _ = timed(call)
        res = holder["res"]
        run.extra = {"ok": bool(res.ok), "nstars": getattr(res, "nstars", None),
                     "rms_arcsec": getattr(res, "rms_arcsec", None), "reason": getattr(res, "reason", None),
                     "steps": dict(res.timings)}
        if res.ok:
            r1, r2, n = ba.residuals(Path(f["image"]), Table.read(f["stars"]))
            run.extra.update({"truth_rms_ra_arcsec": round(r1, 4), "truth_rms_dec_arcsec": round(r2, 4),
                              "truth_stars": n})
        return run

    # first call builds and caches the field's reference catalogue (once per field and epoch)
    first = Series("first frame of the field (includes building the local SCAMP reference catalogue)", "info")
    first.add(solve(frames[0], "own"))
    ours = Series("solve one frame: Source Extractor + own coarse match + SCAMP + header (MissFITS-like)", "ours")
    peer = Series("same chain with SCAMP's own pattern matching (v1-style SExtractor -> SCAMP -> header)", "peer")
    for i in range(repeat):
        f = frames[(i + 1) % len(frames)]
        ours.add(solve(f, "own"))
        peer.add(solve(f, "scamp"))
    shutil.copy2(frames[0]["pristine"], frames[0]["image"])
    so, sp = ours.summary(), peer.summary()
    sf = first.summary()
    failed = [f"{tag}: {r['extra'].get('reason')}" for tag, runs in (("first", sf["runs"]), ("ours", so["runs"]),
                                                                     ("peer", sp["runs"]))
              for r in runs if not r["extra"].get("ok")]
    quality = [{k: r["extra"].get(k) for k in ("nstars", "rms_arcsec", "truth_rms_ra_arcsec", "truth_rms_dec_arcsec")}
               for r in so["runs"]]
    return {
        "series": [so, sp, sf],
        "steps": median_steps([r["extra"]["steps"] for r in so["runs"]]),
        "peer_steps": median_steps([r["extra"]["steps"] for r in sp["runs"]]),
        "targets": [target("astrometry per frame (extraction + solution + header)", "< 10 s",
                           f"{so['median_s']:.2f} s", so["median_s"] < 10.0
                           and all(r["extra"].get("ok") for r in so["runs"]))],
        "ratios": {"peer / ours": sp["median_s"] / so["median_s"]},
        "info": {"frames": len(frames), "generate_s": gen_s, "quality (ours)": quality,
                 "pointing offsets (arcmin)": [round(f["offset_arcmin"], 2) for f in frames],
                 "rotations (deg)": [round(f["rotation_deg"], 2) for f in frames], "failures": failed},
        "notes": ["Frames from gppy.sim (pointing errors up to 5', rotation up to 2 deg, 1\" distortion), "
                  "calibrated with the simulator's true bias/dark/flat; each run restores the frame's "
                  "pre-solution header first (the stage writes the WCS into the file)."],
    }


# --------------------------------------------------------------------------------------------
# stacking: three frames with the stage (SWarp + own work) vs plain SWarp on the same files
# --------------------------------------------------------------------------------------------

def run_stack(size, repeat, workdir: Path, opts: dict) -> dict:
    from bench import bench_stack
    from gppy.naming import weight_of
    from gppy.tools import run_tool

    coadd = bench_stack.coadd
    nx, ny = size
    gw, gh = grid_for(size)
    nframes = int(opts.get("stack_frames", 3))

    def make(folder: Path) -> dict:
        truth = bench_stack.make_frames(folder / "in", n=nframes, shape=(ny, nx), nstars=max(50, nx * ny // 20000),
                                        cosmics=max(10, nx * ny // 100000), seed=1)
        return {"paths": [str(p) for p in truth.paths]}

    data, gen_s = cached(workdir / "stack", {"size": [nx, ny], "frames": nframes, "v": 1}, make)
    if opts.get("generate_only"):
        return {"generated_s": gen_s}
    paths = [Path(p) for p in data["paths"]]
    grid = bench_stack.grid_header(150.0, 2.0, (gw, gh))
    out_root = workdir / "stack-out"
    swarp_times: list[float] = []
    original = coadd.run_swarp

    def timed_swarp(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            swarp_times.append(time.perf_counter() - t)

    def ours():
        out = _fresh(out_root / "ours")
        coadd.run_swarp = timed_swarp
        try:
            return coadd.make_stack(paths, out / "bench.com.fits", grid, settings_for_hash={"bench": 1},
                                    workdir=out_root / "s", options=bench_stack.SwarpOptions(nthreads=0))
        finally:
            coadd.run_swarp = original

    def plain_swarp():
        out = _fresh(out_root / "peer")
        run_tool("swarp", [*[str(p) for p in paths], "-IMAGEOUT_NAME", str(out / "coadd.fits"),
                           "-WEIGHTOUT_NAME", str(out / "coadd.weight.fits"), "-WEIGHT_TYPE", "MAP_WEIGHT",
                           "-WEIGHT_IMAGE", ",".join(str(weight_of(p)) for p in paths),
                           "-COMBINE_TYPE", "WEIGHTED", "-RESAMPLING_TYPE", "LANCZOS3", "-SUBTRACT_BACK", "Y",
                           "-BACK_SIZE", "512", "-FSCALASTRO_TYPE", "VARIABLE", "-CENTER_TYPE", "MANUAL",
                           "-CENTER", "150.0,2.0", "-PIXELSCALE_TYPE", "MANUAL", "-PIXEL_SCALE", "0.505",
                           "-IMAGE_SIZE", f"{gw},{gh}", "-PROJECTION_TYPE", "TAN", "-RESAMPLE_DIR", str(out),
                           "-VMEM_DIR", str(out), "-NTHREADS", "0", "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET"],
                 cwd=out, timeout=3600)

    s_ours = Series(f"stack of {nframes} frames onto {gw}x{gh}: gppy_stack.make_stack (checks, SWarp, mask "
                    f"projection, header, 3 products)", "ours")
    s_peer = Series(f"plain SWarp on the same {nframes} frames and weights, same grid (LANCZOS3, weighted, "
                    f"background subtraction)", "peer")
    products_mb = None
    for _ in range(repeat):
        run, res = timed(ours)
        run.extra = {"swarp_s": round(swarp_times[-1], 3) if swarp_times else None}
        s_ours.add(run)
        products_mb = round(sum(q.stat().st_size for q in (res.path, res.weight_path, res.mask_path)) / 2**20, 1)
        s_peer.add(timed(plain_swarp)[0])
    shutil.rmtree(out_root, ignore_errors=True)
    so, sp = s_ours.summary(), s_peer.summary()
    sw = [r["extra"]["swarp_s"] for r in so["runs"] if r["extra"].get("swarp_s") is not None]
    swarp_med = statistics.median(sw) if sw else float("nan")
    return {
        "series": [so, sp],
        "steps": {"swarp (inside the stage)": round(swarp_med, 3), "stage's own work": round(so["median_s"] - swarp_med, 3)},
        "targets": [target(f"stacking {nframes} full frames", "recorded (no target); v1 anchor: SWarp 20.6 s on "
                           "4 threads", f"{so['median_s']:.2f} s", None)],
        "ratios": {"ours / plain SWarp": so["median_s"] / sp["median_s"]},
        "info": {"frames": nframes, "grid": f"{gw}x{gh}", "generate_s": gen_s, "products_mb": products_mb},
        "notes": ["Synthetic calibrated singles (tests/conftest_stack.make_frames: TAN WCS, small offsets and "
                  "rotations, masks, weights, ZP_AUTO)."],
    }


# --------------------------------------------------------------------------------------------
# subtraction: native engine (in memory, per engine stage) and one message's work (files)
# --------------------------------------------------------------------------------------------

def run_subtract(size, repeat, workdir: Path, opts: dict) -> dict:
    from bench import bench_subtract as bs
    from gppy import tools
    from gppy.config import Settings
    from gppy.messages import PhotometryDone
    from gppy.naming import flag_of, weight_of
    from gppy.xp import backend_name, get_xp
    from gppy_subtract.service import SubtractService

    w, h = grid_for(size)
    regions = tuple(Settings().subtract_nregions)

    def make(folder: Path) -> dict:
        sci, ref, nstars, ksum = bs.make_pair(w, h)
        for tag, pl in (("sci", sci), ("ref", ref)):
            for k in ("data", "var", "mask"):
                np.save(folder / f"{tag}_{k}.npy", getattr(pl, k))
        return {"nstars": nstars, "ksum_true": ksum,
                "meta": {"sci": [sci.egain, sci.saturate], "ref": [ref.egain, ref.saturate]}}

    data, gen_s = cached(workdir / "subtract", {"size": [w, h], "v": 1}, make)
    if opts.get("generate_only"):
        return {"generated_s": gen_s}
    folder = workdir / "subtract"

    def plane(tag):
        e, s = data["meta"][tag]
        return bs.Plane(*(np.load(folder / f"{tag}_{k}.npy") for k in ("data", "var", "mask")), e, s)

    sci, ref = plane("sci"), plane("ref")
    xp = get_xp(opts.get("gpu", "off"))
    params = bs.EngineParams(nregions=regions)
    eng = Series(f"native engine on {w}x{h} arrays in memory ({regions[0]}x{regions[1]} regions): stamps, "
                 "kernel fit, convolution, noise, mask", "ours")
    quality = []
    steps = []
    for _ in range(repeat):
        planes = [bs.Plane(xp.asarray(p.data), xp.asarray(p.var), xp.asarray(p.mask), p.egain, p.saturate)
                  for p in (sci, ref)]
        run, res = timed(lambda planes=planes: bs.subtract(planes[0], planes[1], xp, params))
        eng.add(run)
        steps.append(dict(res.timings))
        quality.append({"stamps_kept": res.n_kept, "stamps": res.n_stamps, "chi2": round(res.mean_chi2, 3),
                        "noise_ratio": round(res.noise_ratio, 3), "kernel_sum": round(res.kernel_sum, 4),
                        "kernel_sum_true": data["ksum_true"], "convolved": res.convolved})
        del res, planes

    # one message's work, files in, products out (inputs written once; products removed between runs)
    root = _fresh(workdir / "subtract-files")
    base = root / "factory"
    base.mkdir()
    cfg = root / "path.json"
    cfg.write_text(json.dumps({"path_base": str(base)}))
    hdr = bs.tan_header(w, h)
    pdir = root / "processed_1x1_gain2750" / "T00001" / "7DT01" / "r"
    pdir.mkdir(parents=True)
    sp = pdir / "calib_7DT01_T00001_20250110_030405_r_300.com.fits"
    sh = hdr.copy()
    sh.update({"OBJECT": "T00001", "FILTER": "r", "DATE-OBS": "2025-01-10T03:04:05", "EGAIN": sci.egain,
               "SATURATE": sci.saturate, "ZP_AUTO": 25.0, "SEEING": 2.1})
    fits.writeto(sp, sci.data, sh)
    rdir = base / "ref_frame" / "r"
    rdir.mkdir(parents=True)
    rp = rdir / "ref_7DT_T00001_20240101_000000_r_3600.com.fits"
    rh = hdr.copy()
    rh.update({"EGAIN": ref.egain, "SATURATE": ref.saturate})
    fits.writeto(rp, ref.data, rh)
    with np.errstate(divide="ignore"):
        fits.writeto(weight_of(sp), np.where(sci.var > 0, 1 / sci.var, 0).astype(np.float32), hdr)
        fits.writeto(weight_of(rp), np.where(ref.var > 0, 1 / ref.var, 0).astype(np.float32), hdr)
    fits.writeto(flag_of(sp), sci.mask, hdr)
    fits.writeto(flag_of(rp), ref.mask, hdr)
    del sci, ref
    svc = SubtractService(Settings(config=cfg, gpu=opts.get("gpu", "off"), subtract_nregions=regions, log_json=False))
    ev = PhotometryDone(night_id="7DT01_2025-01-09", unit="7DT01", image_path=str(sp), image_kind="stack")
    files = Series("one message: read stack + weight + mask and reference, engine, write difference, noise, "
                   "mask, convolved image (SubtractService.process)", "ours")
    for _ in range(repeat):
        run, outs = timed(lambda: svc.process(ev))
        assert outs[0].ok, outs
        files.add(run)
        for key in ("path", "noise_path", "mask_path", "conv_path"):
            p = getattr(outs[0], key, None)
            if p:
                Path(p).unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    se, sf = eng.summary(), files.summary()
    hot = tools.which("hotpants")
    notes = ["Synthetic stack/reference pair (bench/bench_subtract.make_pair: Moffat stars at ~3e-4/px^2, "
             "FWHM 4.2 px science / 3.0 px reference, differential background, masked column, saturated stars)."]
    if hot is None:
        notes.append("Peer HOTPANTS: no `hotpants` binary on this machine, so it was not run. Published-figure "
                     "scaling gives about 157 s for this many pixels (performance-anchors.md section 1, derived).")
    return {
        "series": [se, sf],
        "steps": median_steps(steps),
        "targets": [target(f"subtraction of a {w}x{h} stack (engine)", "< 30 s", f"{se['median_s']:.2f} s",
                           se["median_s"] < 30.0),
                    target(f"subtraction of a {w}x{h} stack (files to products)", "< 30 s",
                           f"{sf['median_s']:.2f} s", sf["median_s"] < 30.0)],
        "ratios": {"HOTPANTS (published, scaled 157 s) / ours (files)": 157.0 / sf["median_s"]} if hot is None else {},
        "info": {"grid": f"{w}x{h}", "backend": backend_name(xp), "regions": list(regions), "stars": data["nstars"],
                 "generate_s": gen_s, "quality": quality, "hotpants": hot or "not present"},
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------
# photometry: one frame (vs Source Extractor alone) and a night's frames serial vs parallel
# --------------------------------------------------------------------------------------------

def run_phot(size, repeat, workdir: Path, opts: dict) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    from bench import bench_phot
    from gppy.tools import run_tool
    from gppy_phot import sextractor

    nx, ny = size
    nframes = int(opts.get("phot_frames", 4))
    workers = int(opts.get("workers", 2))

    def make(folder: Path) -> dict:
        frames = bench_phot.make_frames(folder, nx, ny, nframes)
        return {"frames": [[str(p) for p in f] for f in frames]}

    data, gen_s = cached(workdir / "phot", {"size": [nx, ny], "frames": nframes, "v": 1}, make)
    if opts.get("generate_only"):
        return {"generated_s": gen_s}
    root = workdir / "phot"
    frames = [tuple(f) for f in data["frames"]]
    one = Series("one frame through photometry_products (read, SExtractor pre-run + main run, match, zero "
                 "points, catalogue, PNG, regions, header)", "ours")
    steps, figures = [], []
    for _ in range(repeat):
        run, r = timed(lambda: bench_phot.phot_one((*frames[0], root)))
        one.add(run)
        steps.append(r["timings"])
        figures.append({"zp": round(r["zp"], 4), "seeing": round(r["seeing"], 3)})

    # peer: one Source Extractor run on the same frame, weight and flag map, v1's apertures
    img, wgt, msk = (Path(p) for p in frames[0])
    scratch = _fresh(workdir / "phot-peer")
    flag = sextractor.write_flag_image(fits.getdata(msk), scratch / "flag.fits")
    hdr = fits.getheader(img)
    pixscale = 0.505
    seeing = 2.3
    fwhm_px = seeing / pixscale
    conv = scratch / "g.conv"
    conv.write_text(sextractor.gaussian_conv_text(fwhm_px))
    aps = [2 * 0.6731 * fwhm_px, 2 * fwhm_px, 3 * fwhm_px, 3 / pixscale, 5 / pixscale, 10 / pixscale]
    args = sextractor.build_args(img, scratch / "peer.cat", sextractor.package_file("phot.param"), conv,
                                 gain=float(hdr.get("EGAIN", 0.256)), saturation=float(hdr.get("SATURATE", 60000.0)),
                                 seeing_arcsec=seeing, apertures_px=aps, weight=wgt, flag=flag)
    peer = Series("Source Extractor alone: one run on the same frame with weight and flag maps, 6 apertures "
                  "(the stage's phot.sex/phot.param), catalogue written", "peer")
    for _ in range(repeat):
        peer.add(timed(lambda: run_tool("sextractor", args, cwd=scratch, timeout=3600))[0])
    shutil.rmtree(scratch, ignore_errors=True)

    # a night's frames: serial (as v1) and in parallel
    jobs = [(*f, root) for f in frames]

    def serial():
        for j in jobs:
            bench_phot.phot_one(j)

    def parallel():
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(bench_phot.phot_one, jobs))

    ser = Series(f"{len(jobs)} frames one after another in one process (as v1)", "info")
    par = Series(f"{len(jobs)} frames with {workers} worker processes", "ours")
    ser.add(timed(serial)[0])
    par.add(timed(parallel)[0])
    so, sp, ss, spar = one.summary(), peer.summary(), ser.summary(), par.summary()
    fpm_ser = 60 * len(jobs) / ss["median_s"]
    fpm_par = 60 * len(jobs) / spar["median_s"]
    return {
        "series": [so, sp, ss, spar],
        "steps": median_steps(steps),
        "targets": [target("photometry of one frame", "< 10 s", f"{so['median_s']:.2f} s", so["median_s"] < 10.0),
                    target(f"a night's frames in parallel ({workers} workers)", "throughput recorded",
                           f"{fpm_par:.2f} frames/min (serial {fpm_ser:.2f})", None)],
        "ratios": {"ours / Source Extractor alone": so["median_s"] / sp["median_s"],
                   "parallel / serial throughput": fpm_par / fpm_ser},
        "info": {"frames": len(jobs), "workers": workers, "generate_s": gen_s, "figures": figures,
                 "frames_per_min_serial": round(fpm_ser, 2), "frames_per_min_parallel": round(fpm_par, 2),
                 "seconds_per_frame_parallel": round(spar["median_s"] / len(jobs), 2)},
        "notes": ["Synthetic frames (gppy_phot.synthetic: Moffat stars at 55000/deg^2 to mag 21.5, sky and noise "
                  "at EGAIN 0.256, Gaia-XP-like catalogue), as the astrometry stage leaves them."],
    }


# --------------------------------------------------------------------------------------------
# night: the whole chain for real (local stack: nats-server + the six services as processes)
# --------------------------------------------------------------------------------------------

def _cpu_s(pid: int) -> tuple[float, float]:
    """(own, waited-for children) CPU seconds of a process, from /proc/<pid>/stat."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def run_night(size, repeat, workdir: Path, opts: dict) -> dict:
    import asyncio

    from gppy import naming
    from gppy.config import load_settings
    from gppy.local import LocalStack, free_port
    from gppy.messages import NightReady
    from gppy.progress import follow_night
    from gppy.sim import simulate

    nx, ny = size

    def make(folder: Path) -> dict:
        cfg = simulate(folder, size=(nx, ny), targets=1, filters=["m625"], seed=5,
                       workers=int(opts.get("workers", 2)))
        return {"config": str(cfg)}

    data, gen_s = cached(workdir / "night", {"size": [nx, ny], "v": 1}, make)
    if opts.get("generate_only"):
        return {"generated_s": gen_s}
    config = Path(data["config"])
    settings0 = load_settings(config=str(config))
    paths = settings0.paths()
    night_dir = next(Path(paths.path_obsdata).glob("7DT01/*_gain2750"))
    n_raw = len(list(night_dir.glob("*.fits")))
    series = Series("the whole night through the local stack (nats-server + 6 services): night.ready to "
                    "night.done", "ours")
    per_stage: list[dict] = []
    counts: list[dict] = []
    for _ in range(max(1, min(repeat, int(opts.get("night_repeat", 1))))):
        # products of an earlier run are removed (the raw night, references and catalogues stay)
        for d in (paths.path_processed, paths.path_mframe, paths.path_scratch, paths.path_log):
            shutil.rmtree(d, ignore_errors=True)
        run_dir = _fresh(workdir / "night-run")
        # the watcher is told to scan another unit: the night starts once, from the night.ready
        # published here (it would otherwise also queue the folder itself after its quiet period)
        stack = LocalStack(config=config, nats_port=free_port(), http_base=free_port() % 20000 + 30000,
                           store_dir=run_dir / "nats", log_dir=run_dir / "logs",
                           env={"GPPY_UNITS": '["7DT99"]'})
        missing = stack.start()
        try:
            if missing:
                raise RuntimeError(f"stages missing: {missing}")
            stack.wait_healthy(timeout=180)
            settings = load_settings(config=str(config), nats_url=stack.nats_url)
            ev = NightReady(night_id=naming.night_id("7DT01", night_dir), unit="7DT01", night_dir=str(night_dir))
            cpu0 = {n: _cpu_s(p.pid) for n, p in stack.procs.items()}
            run, prog = timed(lambda ev=ev, settings=settings: asyncio.run(
                follow_night(settings, ev.night_id, publish=ev, timeout=7200, show=False)))
            cpu1 = {n: _cpu_s(p.pid) for n, p in stack.procs.items()}
        finally:
            stack.stop()
        run.extra = {"status": prog.status, "failures": prog.failures[:10]}
        per_stage.append({n: {"cpu_s": round(cpu1[n][0] - cpu0[n][0], 1),
                              "tools_cpu_s": round(cpu1[n][1] - cpu0[n][1], 1)} for n in cpu0})
        # the work is done by the services (and their tools), not by this process
        run.cpu_s = round(sum(v["cpu_s"] + v["tools_cpu_s"] for v in per_stage[-1].values()), 1)
        series.add(run)
        counts.append({"planned_frames": prog.planned_frames, "planned_visits": prog.planned_visits,
                       "done": dict(prog.done), "failed": dict(prog.failed),
                       "active_s": {k: round(prog.last_seen[k] - prog.first_seen[k], 1) for k in prog.first_seen}})
    sn = series.summary()
    c = counts[-1]
    nf = c["planned_frames"] or 0
    ok = all(r["extra"]["status"] == "done" for r in sn["runs"])
    per_frame = sn["median_s"] / nf if nf else float("nan")
    return {
        "series": [sn],
        "steps": {f"{n} CPU s (own + tools)": round(v["cpu_s"] + v["tools_cpu_s"], 1) for n, v in per_stage[-1].items()},
        "targets": [target(f"a real night ({nf} science frames, {c['planned_visits']} visit(s), masters from "
                           f"{n_raw - nf} calibration frames), wall time per science frame",
                           "< 60-180 s per frame (telescope cadence)", f"{per_frame:.1f} s per frame",
                           ok and per_frame < 60.0)],
        "ratios": {},
        "info": {"status": [r["extra"]["status"] for r in sn["runs"]], "raw frames": n_raw, "progress": c,
                 "cpu per process": per_stage[-1], "generate_s": gen_s,
                 "failures": [r["extra"]["failures"] for r in sn["runs"] if r["extra"]["failures"]]},
        "notes": ["gppy.sim night: 1 target, 1 filter (7 bias, 10 dark, 5 flat; science frames of 100 s, 300 s "
                  "and 45 s, grouped into visits by the calib stage's plan), processed end to end by `gppy up`'s "
                  "local stack on this machine, one replica per service; wall time "
                  "from publishing night.ready to night.done. CPU seconds per service process (own and its "
                  "external tools) over the run. Includes building the masters of the night.",
                  "CPU s of the night: the sum over the service processes and their tools (read from /proc "
                  "before stop)."],
    }


def _run_sim(size, repeat, workdir: Path, opts: dict) -> dict:
    from bench.bench_sim import run_sim
    return run_sim(size, repeat, workdir, opts)


def _run_compress(size, repeat, workdir: Path, opts: dict) -> dict:
    from bench.bench_compress import run_compress
    return run_compress(size, repeat, workdir, opts)


STAGES: dict[str, Callable[..., dict]] = {
    "calib": run_calib, "astrometry": run_astrometry, "stack": run_stack, "subtract": run_subtract,
    "phot": run_phot, "night": run_night, "sim": _run_sim, "compress": _run_compress,
}
