"""Smoke run of the benchmark harness (bench/run.py) at a small size.

Not a timed test: it checks that one invocation runs every stage next to its peer, writes every
section of the report and the raw JSON, and that the side-by-side runs computed the same thing
(our master equals ccdproc's on the same files; our reduction equals the plain one; the solved
frame matches the simulator's true star positions). No figure is compared with a time budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gppy import tools

REPO = Path(__file__).resolve().parents[1]
STAGES = ["sim", "calib", "astrometry", "stack", "subtract", "phot", "night", "compress"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "RESULTS.md"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--size", "640x448", "--repeat", "1",
                           "--phot-frames", "2", "--out", str(out), "--data", str(tmp / "data")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else None


def test_harness_runs_every_stage(smoke):
    proc, out, raw = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert raw is not None
    assert list(raw["results"]) == STAGES
    for stage, r in raw["results"].items():
        assert "error" not in r, (stage, r.get("log_tail"))
        kinds = {s["kind"] for s in r["series"]}
        assert "ours" in kinds, stage
        for s in r["series"]:
            assert s["n"] >= 1 and s["median_s"] > 0, (stage, s["name"])
            assert s["peak_tree_mb"] >= s["peak_self_mb"] > 0, (stage, s["name"])
            assert s["load_min"] is not None
            assert s["cpu_median_s"] is not None and s["cpu_median_s"] >= 0, (stage, s["name"])
        assert r["targets"], stage
    # a peer ran next to ours wherever one exists here (subtraction: only with a HOTPANTS binary)
    for stage in ("calib", "astrometry", "stack", "phot"):
        assert "peer" in {s["kind"] for s in raw["results"][stage]["series"]}, stage


def test_report_has_every_section(smoke):
    _, out, raw = smoke
    text = out.read_text()
    for head in ["# Benchmark results", "## Machine", "## Summary against the targets", *[f"## {s}\n" for s in STAGES],
                 "## Unit-night throughput (derived"]:
        assert head in text, head
    for item in ("| CPU |", "| cores |", "| RAM |", "| SWarp |", "| HOTPANTS |", "1-min load average"):
        assert item in text, item
    assert "**total**" in text                      # the derived unit-night table
    assert "small size" in text.lower()              # targets flagged as not applicable
    if tools.which("hotpants") is None:
        assert "no `hotpants` binary" in text


def test_side_by_side_runs_agree(smoke):
    _, _, raw = smoke
    calib = raw["results"]["calib"]["info"]
    # ccdproc.combine with the same rule (3 sigma about the mean with the std, median of survivors)
    assert calib["master max |gppy - ccdproc| (ADU)"] < 1e-3
    # same masters, same formula: the stage's image equals the plain reduction to float32 rounding
    assert calib["reduced image: median |ours - plain| / median |plain|"] < 1e-5
    # astrometry: the timed solution is right against the simulator's true positions
    ast = raw["results"]["astrometry"]
    solved = [r["extra"] for r in ast["series"][0]["runs"] if r["extra"]["ok"]]
    assert solved
    for q in solved:
        assert q["truth_rms_ra_arcsec"] < 0.1 and q["truth_rms_dec_arcsec"] < 0.1, q
    # subtraction: the timed difference is noise-limited (noise ratio from the engine's own residuals)
    for q in raw["results"]["subtract"]["info"]["quality"]:
        assert 0.9 < q["noise_ratio"] < 1.1, q
    # the real chain finished the night with every frame through every stage
    night = raw["results"]["night"]["info"]
    assert night["status"] == ["done"]
    prog = night["progress"]
    assert prog["planned_frames"] >= 3 and not prog["failed"]
    for stage in ("calib", "astrometry", "phot"):
        assert prog["done"][stage] == prog["planned_frames"], (stage, prog)
    assert prog["done"]["stack"] == prog["done"]["subtract"] == prog["planned_visits"] >= 1
    # photometry: the zero point of the synthetic frames is 26.7
    for f in raw["results"]["phot"]["info"]["figures"]:
        assert abs(f["zp"] - 26.7) < 0.05, f
