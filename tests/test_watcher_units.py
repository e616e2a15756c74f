"""Watcher building blocks on real files: folder patterns, snapshots, FITS completeness, the
v1 run log, header snapshots with the real imhead, and the progress bookkeeping."""

from __future__ import annotations

import csv
import json
import re
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest_watcher import SimNight, raw_fits_bytes, write_raw  # noqa: E402

from gppy.config import Settings  # noqa: E402
from gppy.messages import NightReady, StageFailed  # noqa: E402
from gppy_watcher import endofnight  # noqa: E402
from gppy_watcher.progress import NightProgress, collapse_key  # noqa: E402
from gppy_watcher.scanner import CompletenessCache, NightPatterns, take_snapshot  # noqa: E402


def test_patterns_follow_v1_globs():
    pats = NightPatterns.from_settings(Settings())
    assert pats.classify("2025-01-02_gain2750") == "survey"
    assert pats.classify("2025-01-02_ToO_gain2750") == "too"
    assert pats.classify("2025-00-02") == "test"
    assert pats.classify("2023-00-17_gain2750") == "test"  # v1 treats '2023-00' paths as test data
    for other in ("2025-01-02", "2025-01-02_gain0", "1999-01-02_gain2750", "2025-01-02_gain2750.tmp", "log"):
        assert pats.classify(other) is None


def test_snapshot_counts_every_file_and_completeness_sees_truncation(tmp_path):
    night = tmp_path / "2025-01-02_gain2750"
    full = [write_raw(night, i) for i in range(3)]
    (night / "sub").mkdir()
    (night / "sub" / "notes.txt").write_text("hello")
    part = write_raw(night, 3, truncate_to=0.6)
    snap, fits_files = take_snapshot(night)
    sizes = sum(p.stat().st_size for p in [*full, part]) + 5
    assert (snap.size, snap.count, snap.fits) == (sizes, 5, 4)
    assert sorted(fits_files) == sorted([*full, part])
    cache = CompletenessCache()
    assert cache.incomplete(fits_files) == [part]
    part.write_bytes(raw_fits_bytes(3))  # the copy finishes
    assert cache.incomplete(fits_files) == []
    # a header that ends early is incomplete too
    part.write_bytes(raw_fits_bytes(3)[:1000])
    assert cache.incomplete(fits_files) == [part]


def test_unit_log_line_is_v1_format(tmp_path):
    log_path = tmp_path / "log" / "7dt01.log"
    start = datetime(2025, 1, 2, 20, 0, 5, tzinfo=UTC).timestamp()
    end = start + 3723
    endofnight.append_unit_log(log_path, "/data/obsdata/7DT01/2025-01-02_gain2750", start, end, "-")
    endofnight.append_unit_log(log_path, "/data/obsdata/7DT01/2025-01-03_gain2750", start, end, "Failed: a, b")
    rows = list(csv.reader(log_path.open()))
    assert rows[0] == ["date", "start", "end", "note"]
    assert rows[1] == ["/data/obsdata/7DT01/2025-01-02_gain2750", "2025-01-03_05:00:05_(KST)",
                       "2025-01-03_06:02:08_(KST)", "-"]
    assert rows[2][3] == "Failed: a, b"
    assert endofnight.logged_nights(log_path) == {"/data/obsdata/7DT01/2025-01-02_gain2750",
                                                  "/data/obsdata/7DT01/2025-01-03_gain2750"}
    kst = timezone(timedelta(hours=9))
    assert datetime.strptime(rows[1][1], "%Y-%m-%d_%H:%M:%S_(KST)").replace(tzinfo=kst).timestamp() == start


def test_header_snapshots_with_imhead(tmp_path):
    processed = tmp_path / "processed"
    single = processed / "T00001" / "7DT01" / "m425" / "calib_7DT01_T00001_20250102_030000_m425_60.fits"
    diff = single.parent / "transient" / "calib_7DT01_T00001_20250102_030000_m425_180.com.subt.fits"
    SimNight.write_image(single, "T00001", "m425", "single")
    SimNight.write_image(diff, "T00001", "m425", "difference")
    outside = tmp_path / "elsewhere.fits"
    SimNight.write_image(outside, "X", "m425", "single")
    written, problems = endofnight.snapshot_headers([str(single), str(diff), str(outside),
                                                     str(single.with_name("missing.fits"))], processed)
    heads = sorted(Path(p) for p in written)
    assert heads == sorted([single.parent / "header" / (single.name[:-5] + ".head"),
                            single.parent / "header" / (diff.name[:-5] + ".head")])
    text = (single.parent / "header" / (diff.name[:-5] + ".head")).read_text()
    assert re.search(r"PRODKIND= 'difference'", text) and re.search(r"OBJECT  = 'T00001\s*'", text)
    assert len(problems) == 2 and any("outside" in p for p in problems) and any("missing" in p for p in problems)


def _night(tmp_path, visits):
    settings = Settings(config=None)
    nd = tmp_path / "obsdata" / "7DT01" / "2025-01-02_gain2750"
    ready = NightReady(night_id="7DT01_2025-01-02_gain2750", unit="7DT01", night_dir=str(nd))

    class _S:
        def paths(self):
            class P:
                path_processed = tmp_path / "processed"
            return P()
    sim = SimNight.make(_S(), ready, visits)
    return settings, sim


def test_progress_waits_for_every_branch_and_collapses_twins(tmp_path):
    _, sim = _night(tmp_path, {"A": [0, 1, 2], "B": [3]})
    prog = NightProgress(sim.ready.night_id, sim.ready.night_dir)
    assert prog.outstanding() == ["night.plan (calibration)"]
    prog.apply(sim.plan())
    assert len(prog.outstanding()) == 4
    f0, f1, f2, f3 = sim.frames
    for f in (f0, f1, f3):
        for ev in [sim.calibrated(f, write=False), sim.solved(f), sim.phot(f.calib, "single")]:
            prog.apply(ev)
    # frame 2: astrometry gives up; the runtime reports stage.failed, then the dead letter
    prog.apply(sim.calibrated(f2, write=False))
    new = prog.apply(StageFailed(night_id=sim.ready.night_id, unit="7DT01", stage="astrometry",
                                 item_path=str(f2.calib), reason="SCAMP: no match"))
    assert len(new) == 1
    assert prog.apply_dead_letter("astrometry", "SCAMP: no match", sim.calibrated(f2, write=False).model_dump_json()) == []
    assert prog.failures[0]["dlq"] is True and len(prog.failures) == 1
    assert prog.outstanding() == ["stack of visit A", "stack of visit B"]
    for v in ("A", "B"):
        prog.apply(sim.stacked(v, write=False))
        prog.apply(sim.phot(sim.stack_path(v), "stack"))
    assert prog.outstanding() == [f"difference of {sim.stack_path('A').name}",
                                  f"difference of {sim.stack_path('B').name}"]
    prog.apply(sim.differenced("A", write=False))
    prog.apply(sim.differenced("B", ok=False))
    assert prog.outstanding() == [f"photometry of difference {sim.diff_path('A').name}"]
    prog.apply(sim.phot(sim.diff_path("A"), "difference"))
    assert prog.complete()
    assert prog.outcome() == ("done", "-")
    c = prog.counts()
    assert c["phot_single"]["done"] == 3 and c["astrometry"]["failed"] == 1 and c["stack"]["done"] == 2
    assert c["subtract"] == {"done": 1, "no_reference": 1, "failed": 0}
    # survives a round trip through JSON (the ledger stores it so)
    again = NightProgress.from_dict(json.loads(json.dumps(prog.to_dict())))
    assert again.counts() == c and again.complete()


def test_progress_restriction_night_failure_and_collapse_key(tmp_path):
    _, sim = _night(tmp_path, {"A": [0, 1]})
    prog = NightProgress(sim.ready.night_id, sim.ready.night_dir, filters=["m500"])
    prog.apply(sim.plan())
    assert prog.frames == {} and prog.skipped == 2 and prog.complete()
    assert prog.outcome() == ("done", "no frame matches the targets/filters")
    # the calibration stage gives up on the night itself: a night-level failure
    prog = NightProgress(sim.ready.night_id, sim.ready.night_dir)
    prog.apply_dead_letter("calib", "no bias frames", sim.ready.model_dump_json())
    assert prog.complete() and prog.outcome() == ("failed", "calib: no bias frames")
    # a dead letter for a frame of a visit makes its stack definitively failed
    prog = NightProgress(sim.ready.night_id, sim.ready.night_dir)
    prog.apply(sim.plan())
    for f in sim.frames:
        for ev in [sim.calibrated(f, write=False), sim.solved(f)]:
            prog.apply(ev)
    prog.apply(sim.phot(sim.frames[0].calib, "single"))
    prog.apply(sim.phot(sim.frames[1].calib, "single"))
    prog.apply_dead_letter("stack", "SWarp: exit code 1", sim.phot(sim.frames[1].calib, "single").model_dump_json())
    assert prog.complete() and prog.outcome()[0] == "done" and prog.counts()["stack"]["failed"] == 1
    a = collapse_key("phot", "/data/x/calib_7DT01_T1_20250102_030000_m425_60.fits: 12 stars < 15")
    b = collapse_key("phot", "/data/y/calib_7DT01_T1_20250102_031000_m425_60.fits: 9 stars < 15")
    assert a == b and a != collapse_key("astrometry", "/data/x/a.fits: 12 stars < 15")


def test_upstream_outcomes_are_not_reported_as_new_failures(tmp_path):
    """The phot stage answers a 'no reference' difference with phot.done ok=False on the stack's
    path, and the stack stage reports a visit none of whose frames came through: neither is a
    failure of its own (no message), and neither leaves the night waiting."""
    _, sim = _night(tmp_path, {"A": [0], "B": [1]})
    prog = NightProgress(sim.ready.night_id, sim.ready.night_dir)
    prog.apply(sim.plan())
    fa, fb = sim.frames
    for ev in [sim.calibrated(fa, write=False), sim.solved(fa), sim.phot(fa.calib, "single"),
               sim.stacked("A", write=False), sim.phot(sim.stack_path("A"), "stack"), sim.differenced("A", ok=False)]:
        assert prog.apply(ev) == []
    no_ref = sim.phot(sim.stack_path("A"), "difference", ok=False, reason="no reference image for this field")
    assert prog.apply(no_ref) == []
    new = prog.apply(sim.solved(fb, ok=False, reason="no solution"))
    assert [f["stage"] for f in new] == ["astrometry"]
    assert prog.apply(sim.phot(fb.calib, "single", ok=False, reason="frame not solved: no solution")) == []
    assert prog.apply(StageFailed(night_id=sim.ready.night_id, unit="7DT01", stage="stack", item_path="B",
                                  reason="visit B: no frame of it was processed successfully")) == []
    assert prog.complete() and prog.outcome() == ("done", "-")
    assert prog.counts()["stack"] == {"done": 1, "failed": 1}


def test_summary_path_keeps_the_night_id(tmp_path):
    assert endofnight.summary_path(tmp_path, "7DT01_2025-01-15_gain2750") == \
        tmp_path / "nights" / "7DT01_2025-01-15_gain2750.json"
    assert endofnight.summary_path(tmp_path, "7DT01_../../etc_x").parent == tmp_path / "nights"
