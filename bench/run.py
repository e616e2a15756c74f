"""Benchmark harness: every stage timed side by side with its peer, results in bench/RESULTS.md.

    .venv/bin/python -m bench.run [--size full|WxH] [--repeat N] [--only stage,...]
                                  [--out bench/RESULTS.md] [--data bench/data] [--profile DIR]

Stages (``--only``): calib, astrometry, stack, subtract, phot, night, compress (see :mod:`bench.stages`):

* calib: master of 9 bias frames vs ``ccdproc.combine`` (sigma-clipped median) on the same
  files; reduction of one frame (raw read to products written) vs a plain astropy/NumPy
  reduction;
* astrometry: one simulated frame solved by the stage vs the same tools with SCAMP's own
  pattern matching;
* stack: three frames stacked by the stage vs plain SWarp on the same files and grid;
* subtract: the native engine on a stack-sized pair (and one message's work, files to
  products); HOTPANTS where a binary is present (there is none here: the report says so);
* phot: one frame vs Source Extractor alone; a night's frames serial vs in parallel;
* night: the whole chain for real on a short simulated night (`gppy up`'s local stack: NATS and
  the six services as processes), wall time from night.ready to night.done and CPU seconds per
  service.
* compress: write/read time and size of a reduced frame (image, weight, mask) and of a stack
  as plain FITS and tile-compressed (RICE_1 lossless / q16 lossy, GZIP_2 lossless), the
  lossy codec's effect on noise and aperture fluxes, and whether Source Extractor and SWarp
  read tile-compressed files (:mod:`bench.bench_compress`).

Each stage runs in its own Python process (so its peak memory is its own), the data are made
once by the stage's bench generators and cached under ``--data/<W>x<H>/`` (git-ignored), each
measurement is repeated ``--repeat`` times with ours and the peer alternating, and medians are
reported with the peak RSS and the 1-minute load average around each run. The unit-night
figure is *derived* from the per-stage medians (it is labelled so in the report).

Benchmarks are not tests: CI only runs a small smoke of this harness
(tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDER = ["sim", "calib", "astrometry", "stack", "subtract", "phot", "night", "compress"]
FULL = (9576, 6388)
FRAMES_PER_VISIT = 3
NIGHT_FRAMES = 300


def parse_size(text: str) -> tuple[int, int]:
    if text.lower() == "full":
        return FULL
    w, h = text.lower().split("x")
    return int(w), int(h)


# ------------------------------------------------------------------------------ child process

def child(args: argparse.Namespace) -> int:
    from bench.stages import STAGES

    size = parse_size(args.size)
    opts = {"gpu": args.gpu, "workers": args.workers, "phot_frames": args.phot_frames,
            "generate_only": args.generate_only}
    data = Path(args.data) / f"{size[0]}x{size[1]}"
    data.mkdir(parents=True, exist_ok=True)
    fn = STAGES[args.child]
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(fn, size, args.repeat, data, opts)
        pdir = Path(args.profile)
        pdir.mkdir(parents=True, exist_ok=True)
        prof.dump_stats(pdir / f"{args.child}.prof")
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(60)
        buf.write("\n\n==== by own time ====\n")
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
        (pdir / f"{args.child}.txt").write_text(buf.getvalue())
    else:
        result = fn(size, args.repeat, data, opts)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["measured_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    Path(args.json).write_text(json.dumps(result, indent=1, default=_jsonable))
    return 0


def _jsonable(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


def run_stage(stage: str, args: argparse.Namespace) -> dict:
    """Run one stage's benchmark in a fresh Python process; its result (or the error)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{stage}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.run", "--child", stage, "--size", args.size, "--repeat", str(args.repeat),
               "--data", str(args.data), "--json", str(out), "--gpu", args.gpu, "--workers", str(args.workers),
               "--phot-frames", str(args.phot_frames)]
        if args.profile:
            cmd += ["--profile", str(args.profile)]
        if args.generate_only:
            cmd += ["--generate-only"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout)[-3000:]
            return {"error": f"exit code {proc.returncode}", "log_tail": tail, "wall_s": round(wall, 1)}
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------ machine facts

def _version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not present"
    text = (p.stdout + p.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    mods = {}
    for m in ("numpy", "scipy", "astropy", "ccdproc", "astroscrappy", "reproject", "cupy"):
        try:
            mods[m] = __import__(m).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as such
            mods[m] = "not installed"
    from gppy import tools

    def tool(name: str, flag: str) -> str:
        exe = tools.which(name)
        return _version([exe, flag]) if exe else "not present"

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
        commit += f" ({len(dirty)} tracked file(s) modified in the working tree)" if dirty else " (clean)"
    except (OSError, subprocess.TimeoutExpired):
        pass
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": aff, "ram": ram,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(), "modules": mods,
            "Source Extractor": tool("sextractor", "--version"), "SCAMP": tool("scamp", "-v"),
            "SWarp": tool("swarp", "-v"), "MissFITS": tool("missfits", "-v"), "HOTPANTS": tool("hotpants", "-v"),
            "git": commit}


# ------------------------------------------------------------------------------ derived chain

def unit_night(results: dict, size: tuple[int, int]) -> dict | None:
    """Per-frame wall and CPU seconds of every stage and the unit-night estimate, from the
    stage medians (wall) and the CPU medians where recorded."""

    def pick(stage: str, test) -> tuple[float, float | None] | None:
        r = results.get(stage)
        if not r or "error" in r:
            return None
        for s in r["series"]:
            if test(s):
                return s["median_s"], s.get("cpu_median_s")
        return None

    calib_red = pick("calib", lambda s: s["kind"] == "ours" and "default settings" in s["name"])
    master = pick("calib", lambda s: s["kind"] == "ours" and s["name"].startswith("master"))
    ast = pick("astrometry", lambda s: s["kind"] == "ours")
    stack = pick("stack", lambda s: s["kind"] == "ours")
    sub = pick("subtract", lambda s: s["kind"] == "ours" and s["name"].startswith("one message"))
    phot = pick("phot", lambda s: s["kind"] == "ours" and s["name"].startswith("one frame"))
    if None in (calib_red, master, ast, stack, sub, phot):
        return None
    gw, gh = (10200, 6800) if tuple(size) == FULL else (round(size[0] * 10200 / 9576), round(size[1] * 6800 / 6388))
    px_ratio = gw * gh / (size[0] * size[1])
    n_masters = 3  # bias, dark, one flat per night (more filters: one flat each)
    v = FRAMES_PER_VISIT

    def scale(x: tuple[float, float | None], f: float) -> tuple[float, float | None]:
        return x[0] * f, (x[1] * f if x[1] is not None else None)

    rows = [
        (f"masters ({n_masters} x master of 9, once per night) / {NIGHT_FRAMES}", scale(master, n_masters / NIGHT_FRAMES),
         "measured, amortised"),
        ("calibration of the frame (default: CR + trails)", calib_red, "measured"),
        ("astrometry", ast, "measured"),
        ("photometry of the frame", phot, "measured"),
        (f"stack of a {v}-frame visit / {v}", scale(stack, 1 / v), "measured"),
        (f"photometry of the stack / {v}", scale(phot, px_ratio / v), "not measured: single-frame photometry x pixel ratio"),
        (f"subtraction (files to products) / {v}", scale(sub, 1 / v), "measured"),
        (f"transient search on the difference / {v}", scale(phot, px_ratio / v),
         "not measured: assumed = single-frame photometry x pixel ratio"),
    ]
    per_frame = sum(r[1][0] for r in rows)
    cpus = [r[1][1] for r in rows]
    cpu_frame = sum(cpus) if None not in cpus else None
    par = results["phot"]["info"].get("seconds_per_frame_parallel")
    return {"rows": rows, "per_frame_s": per_frame, "night_s": per_frame * NIGHT_FRAMES, "cpu_per_frame_s": cpu_frame,
            "phot_parallel_s_per_frame": par}


# ------------------------------------------------------------------------------ report

def _f(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _flat(items) -> list:
    out = []
    for x in items:
        out += _flat(x) if isinstance(x, list | tuple) else [x]
    return out


def _pf(ok, full: bool) -> str:
    if ok is None:
        return "recorded"
    verdict = "PASS" if ok else "FAIL"
    return verdict if full else f"({verdict}: small size, target is for full size)"


def report(results: dict, args: argparse.Namespace, mach: dict, started: str, load_start, load_end,
           total_s: float) -> str:
    size = parse_size(args.size)
    full = tuple(size) == FULL
    from bench.stages import grid_for

    gw, gh = grid_for(size)
    L: list[str] = []
    L.append("# Benchmark results\n")
    cmd = " ".join(["python -m bench.run", "--size", args.size, "--repeat", str(args.repeat)]
                   + (["--only", args.only] if args.only else []) + (["--merge"] if args.merge else []))
    took = f"; {total_s / 60:.1f} min in all" if total_s else ""
    L.append(f"Written by `{cmd}` (bench/run.py) on {started} UTC{took}. "
             f"Frames {size[0]}x{size[1]}, stack grid {gw}x{gh}; every figure is the median of {args.repeat} "
             f"run(s) unless the table says otherwise; ours and the peer alternate in the same invocation. "
             f"CPU s: user + system seconds of the benchmark process and of the tools it waited for "
             f"(on a loaded machine the wall time stretches, the CPU time much less; with 2 cores the "
             f"unloaded wall time is at least CPU s / 2). "
             f"Peak memory: RSS of the Python process (exact, kernel high-water mark reset before each run) "
             f"and of the whole process tree including external tools (sampled every 20 ms).\n")
    if args.merge:
        L.append("Stages not named by `--only` keep the results of an earlier invocation (merged); each "
                 "section gives the time its stage finished.\n")
    if not full:
        L.append("**Small size: the targets are for full 9576x6388 frames; pass/fail is shown in brackets "
                 "for information only.**\n")
    L.append("## Machine\n")
    L.append("| item | value |\n|---|---|")
    L.append(f"| CPU | {mach['cpu']} |")
    L.append(f"| cores | {mach['cores']} ({mach['cores_usable']} usable by this process) |")
    L.append(f"| RAM | {mach['ram']} |")
    L.append(f"| OS / Python | {mach['os']} / {mach['python']} |")
    L.append("| Python modules | " + ", ".join(f"{k} {v}" for k, v in mach["modules"].items()) + " |")
    for k in ("Source Extractor", "SCAMP", "SWarp", "MissFITS", "HOTPANTS"):
        L.append(f"| {k} | {mach[k]} |")
    L.append(f"| git commit | {mach['git']} |")
    L.append(f"| GPU backend requested | {args.gpu} |")
    L.append(f"| 1-min load average | {load_start[0]:.2f} at start, {load_end[0]:.2f} at end "
             f"(5-min {load_start[1]:.2f} / {load_end[1]:.2f}); the machine is shared, see the load "
             f"next to each figure |")
    L.append("")

    L.append("## Summary against the targets\n")
    L.append("| stage | figure | target | measured (median) | result | load 1-min during runs |\n|---|---|---|---|---|---|")
    for stage in ORDER:
        r = results.get(stage)
        if r is None:
            continue
        if "error" in r:
            L.append(f"| {stage} | - | - | error: {r['error']} | FAIL (did not run) | - |")
            continue
        ours = r["series"][0]
        failures = [f for f in _flat((r.get("info") or {}).get("failures") or []) if not str(f).startswith("first")]
        for t in r["targets"]:
            value = t["value"] + (f" ({len(failures)} failure(s) reported, see below)" if failures else "")
            ok = t["pass"] if t["pass"] is None else (t["pass"] and not failures)
            L.append(f"| {stage} | {t['what']} | {t['target']} | {value} | {_pf(ok, full)} | "
                     f"{_f(ours['load_min'])}-{_f(ours['load_max'])} |")
    chain = unit_night(results, size)
    if chain:
        pf = chain["per_frame_s"]
        verdict = _pf(pf < 60.0, full) if pf < 60.0 or pf >= 180.0 else (
            f"PARTIAL: keeps up with one frame per {pf:.0f} s or slower, not with 60 s" if full
            else "(PARTIAL: small size)")
        L.append(f"| chain (derived) | unit-night of {NIGHT_FRAMES} frames with stacking and subtraction | "
                 f"< 60-180 s per frame (telescope cadence) | {pf:.1f} s per frame "
                 f"({chain['night_s'] / 3600:.2f} h per night) | {verdict} | derived |")
    L.append("")

    for stage in ORDER:
        r = results.get(stage)
        if r is None:
            continue
        L.append(f"## {stage}\n")
        if "error" in r:
            L.append(f"Error: {r['error']} after {r.get('wall_s')} s.\n\n```\n{r.get('log_tail', '')}\n```\n")
            continue
        L.append("| measurement | ours/peer | median s | min-max s | runs | CPU s (median) | peak RSS python / tree MB | "
                 "load 1-min |\n|---|---|---|---|---|---|---|---|")
        for s in r["series"]:
            L.append(f"| {s['name']} | {s['kind']} | {_f(s['median_s'])} | {_f(s['min_s'])}-{_f(s['max_s'])} | "
                     f"{s['n']} | {_f(s.get('cpu_median_s'), 1)} | {_f(s['peak_self_mb'], 0)} / "
                     f"{_f(s['peak_tree_mb'], 0)} | {_f(s['load_min'])}-{_f(s['load_max'])} |")
        L.append("")
        for k, v in (r.get("ratios") or {}).items():
            L.append(f"- ratio {k}: **{v:.2f}**")
        if r.get("steps"):
            L.append("- stage's own step timings (median s): " + ", ".join(f"{k} {_f(v)}" for k, v in r["steps"].items()))
        if r.get("peer_steps"):
            L.append("- peer step timings (median s): " + ", ".join(f"{k} {_f(v)}" for k, v in r["peer_steps"].items()))
        for k, v in (r.get("info") or {}).items():
            if v is None:
                continue
            if k == "generate_s":
                L.append(f"- data generated in {v:.1f} s (cached for later runs)")
                continue
            L.append(f"- {k}: {json.dumps(v, default=str) if not isinstance(v, str) else v}")
        for n in r.get("notes") or []:
            L.append(f"- {n}")
        L.append(f"- stage benchmark wall time (incl. data generation/loading): {r.get('wall_s')} s, "
                 f"finished {r.get('measured_at', '?')} UTC")
        L.append("")

    L.append("## Unit-night throughput (derived from the per-stage medians, not a run of the chain)\n")
    night = results.get("night")
    if night and "error" not in night:
        L.append(f"The chain was also run for real on a short simulated night (section night above): "
                 f"{night['targets'][0]['value']} of wall time, masters included. The table below is the "
                 f"estimate for a full unit-night from the per-stage medians.\n")
    if chain is None:
        L.append("Not computed: a stage's figure is missing.\n")
    else:
        L.append(f"Seconds of work per science frame, one stage at a time on this machine (each stage uses both "
                 f"cores where it can), {FRAMES_PER_VISIT} frames per visit, {NIGHT_FRAMES} frames per unit-night:\n")
        L.append("| part | wall s per frame | CPU s per frame | source |\n|---|---|---|---|")
        for name, (sec, cpu), src in chain["rows"]:
            L.append(f"| {name} | {sec:.2f} | {_f(cpu)} | {src} |")
        L.append(f"| **total** | **{chain['per_frame_s']:.2f}** | **{_f(chain['cpu_per_frame_s'])}** | sum |")
        L.append("")
        if chain["cpu_per_frame_s"]:
            c = chain["cpu_per_frame_s"]
            L.append(f"- On an otherwise idle 2-core machine with the stages overlapping (the services run "
                     f"concurrently), the CPU time bounds the throughput at about {c / 2:.1f} s per frame "
                     f"({c / 2 * NIGHT_FRAMES / 3600:.2f} h per {NIGHT_FRAMES}-frame night); the wall figures "
                     f"above were taken on the shared machine (load next to each figure).")
        n = NIGHT_FRAMES
        L.append(f"- {n} frames: {chain['night_s'] / 3600:.2f} h of processing vs {n * 60 / 3600:.1f} h (60 s cadence) "
                 f"to {n * 180 / 3600:.1f} h (180 s cadence) of observing: the local stack "
                 f"{'keeps up' if chain['per_frame_s'] < 60 else 'keeps up only at the slower cadences' if chain['per_frame_s'] < 180 else 'does not keep up'} "
                 f"({chain['per_frame_s']:.1f} s of work per frame; {100 * chain['per_frame_s'] / 60:.0f} % of the "
                 f"60-s budget, {100 * chain['per_frame_s'] / 180:.0f} % of the 180-s budget).")
        if chain.get("phot_parallel_s_per_frame"):
            L.append(f"- Photometry in parallel ({args.workers} workers) measured "
                     f"{chain['phot_parallel_s_per_frame']:.2f} s per frame of wall time (vs the one-frame "
                     f"figure above), a sign of how much overlapping stages gains on 2 cores.")
        L.append("- v1 took 4,899-12,541 s per unit-night on 2 x A100 + 4 CPU workers "
                 "(performance-anchors.md section 0).")
    L.append("")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full", help="full (9576x6388) or WxH")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated stages (default: all): " + ",".join(ORDER))
    ap.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--data", default=str(REPO / "bench" / "data"), help="data cache (git-ignored)")
    ap.add_argument("--gpu", default="off", choices=["auto", "on", "off"])
    ap.add_argument("--workers", type=int, default=2, help="processes for the parallel photometry run")
    ap.add_argument("--phot-frames", type=int, default=4, help="frames of the parallel photometry run")
    ap.add_argument("--profile", help="write cProfile output of each stage into this folder")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other stages' results from an earlier run (the --out file's .json)")
    ap.add_argument("--generate-only", action="store_true", help="only make (cache) the data, time nothing")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report from the --out file's .json without running anything")
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    stages = [s.strip() for s in args.only.split(",") if s.strip()] or ORDER
    bad = [s for s in stages if s not in ORDER]
    if bad:
        ap.error(f"unknown stage(s) {bad}; known: {ORDER}")
    args.data = str(Path(args.data).resolve())
    if args.report_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        for k in ("size", "repeat", "only", "gpu", "workers", "merge"):
            setattr(args, k, saved["args"].get(k, getattr(args, k)))
        meta = saved.get("report", {})
        if "started" not in meta:
            mtime = Path(args.out).with_suffix(".json").stat().st_mtime
            meta["started"] = dt.datetime.fromtimestamp(mtime, dt.UTC).strftime("%Y-%m-%d %H:%M") + " (finished)"
        Path(args.out).write_text(report(saved["results"], args, saved["machine"], meta.get("started", "?"),
                                         meta.get("load_start", os.getloadavg()), meta.get("load_end", os.getloadavg()),
                                         meta.get("total_s", 0.0)))
        print(f"[bench] rewrote {args.out}")
        return 0
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    load_start = os.getloadavg()
    mach = machine()
    t0 = time.perf_counter()
    results: dict = {}
    earlier = Path(args.out).with_suffix(".json")
    if args.merge and earlier.exists():
        old = json.loads(earlier.read_text())
        if old["args"]["size"] != args.size:
            ap.error(f"--merge: {earlier} holds size {old['args']['size']}, not {args.size}")
        results = {k: v for k, v in old["results"].items() if k not in stages}
    for stage in stages:
        print(f"[bench] {stage} ({args.size}, repeat {args.repeat}), load {os.getloadavg()[0]:.2f} ...", flush=True)
        results[stage] = run_stage(stage, args)
        r = results[stage]
        if args.generate_only:
            print(f"[bench] {stage}: data {'cached' if r.get('generated_s') is None else 'made'} {r}", flush=True)
            continue
        if "error" in r:
            print(f"[bench] {stage}: ERROR {r['error']}\n{r.get('log_tail', '')}", flush=True)
        else:
            print(f"[bench] {stage}: " + "; ".join(f"{s['name'][:50]}: {s['median_s']:.2f} s" for s in r["series"]),
                  flush=True)
    if args.generate_only:
        return 1 if any("error" in r for r in results.values()) else 0
    results = {k: results[k] for k in ORDER if k in results}
    load_end, total_s = os.getloadavg(), time.perf_counter() - t0
    text = report(results, args, mach, started, load_start, load_end, total_s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps({"machine": mach, "args": vars(args), "results": results,
                                                      "report": {"started": started, "load_start": load_start,
                                                                 "load_end": load_end, "total_s": total_s}},
                                                     indent=1, default=_jsonable))
    print(f"[bench] wrote {out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
