"""End to end on the embedded default: `gppy up`'s local stack (real nats-server, the six
services as processes) processes a simulated night; products are checked against the truth."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy import naming, truthcheck
from gppy.config import load_settings
from gppy.local import LocalStack, free_port
from gppy.messages import NightReady
from gppy.progress import follow_night
from gppy.sim import simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def processed_night(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    config = Path(simulate(out, targets=2, filters=["m650", "r"], size=(1280, 900), seed=11))
    stack = LocalStack(config=config, nats_port=free_port(), http_base=free_port() % 20000 + 30000,
                       log_dir=out / "logs")
    missing = stack.start()
    assert not missing, f"stages missing: {missing}"
    try:
        stack.wait_healthy(timeout=120)
        settings = load_settings(config=str(config), nats_url=stack.nats_url)
        paths = settings.paths()
        night_dir = next(paths.path_obsdata.glob("7DT01/*_gain2750"))
        ev = NightReady(night_id=naming.night_id("7DT01", night_dir), unit="7DT01", night_dir=str(night_dir))
        prog = asyncio.run(follow_night(settings, ev.night_id, publish=ev, timeout=1500, show=False))
    finally:
        stack.stop()
    return out, paths, prog


def test_night_completes(processed_night):
    out, paths, prog = processed_night
    assert prog.status == "done", (prog.status, prog.failures, (out / "logs").as_posix())
    truth = json.loads((out / "truth" / "night.json").read_text())
    n_science = sum(1 for f in truth["frames"] if f["kind"] == "science")
    assert prog.planned_frames == n_science
    assert prog.done["calib"] == n_science
    assert prog.done["astrometry"] == n_science


def test_every_frame_solved_against_truth(processed_night):
    out, paths, prog = processed_night
    rows = truthcheck.astrometry_residuals(Path(paths.path_processed), out / "truth")
    assert len(rows) == prog.planned_frames
    for r in rows:
        assert r["rms_ra"] < 0.10 and r["rms_dec"] < 0.10, r


def test_zero_points_against_truth(processed_night):
    out, paths, prog = processed_night
    rows = truthcheck.zeropoint_errors(Path(paths.path_processed), out / "truth")
    assert len(rows) == prog.planned_frames
    errors = np.array([r["error"] for r in rows])
    quoted = np.array([r["quoted"] for r in rows])
    # issue P8: within 0.02 mag of the truth; a frame whose own quoted ZP error is larger
    # (few stars, short exposure) may be off by up to 3 of its sigmas
    assert np.all(np.abs(errors) < np.maximum(0.02, 3 * quoted)), rows
    assert np.median(np.abs(errors)) < 0.01, rows
    assert np.all(np.abs(errors / quoted) < 3.5), rows  # the quoted errors are honest


def test_each_visit_stacked_subtracted_and_searched_once(processed_night):
    out, paths, prog = processed_night
    processed = Path(paths.path_processed)
    stacks = sorted(processed.rglob("*.com.fits"))
    stacks = [s for s in stacks if ".weight." not in s.name and ".mask." not in s.name]
    assert len(stacks) == prog.planned_visits
    diffs = sorted(processed.rglob("*.subt.fits"))
    assert len(diffs) == len(stacks)  # every target has a reference in the simulation
    for s in stacks:
        hdr = fits.getheader(s)
        assert hdr["NCOMBINE"] >= 1 and "ZP_AUTO" in hdr
    cats = sorted(processed.rglob("*.subt.transient.cat"))
    assert len(cats) == len(diffs)
    # no half-written file left under a temporary name
    assert not list(processed.rglob("*.part"))


def test_transients_recovered(processed_night):
    out, paths, prog = processed_night
    covered, found = truthcheck.transients_recovered(Path(paths.path_processed), out / "truth")
    assert covered > 0
    assert found >= covered // 2, (found, covered)


def test_end_of_night_products(processed_night):
    out, paths, prog = processed_night
    assert prog.summary_path and Path(prog.summary_path).exists()
    heads = list(Path(paths.path_processed).rglob("header/*.head"))
    assert heads
    log = paths.unit_log("7DT01").read_text().splitlines()
    assert log[0] == "date,start,end,note" and any("2025-01-15_gain2750" in line for line in log[1:])
