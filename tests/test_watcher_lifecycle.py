"""The watcher service with a real nats-server: readiness, ToO priority, a night followed to its
end from the stages' events, bounded retries, ad hoc nights with restrictions, stalls.

Other stages are stood in for by the test: it publishes their events on the bus, or runs a
tiny StageService of its own (the real runtime) where a stage's consumption order matters.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest_watcher import (  # noqa: E402
    UNIT,
    Publisher,
    SimNight,
    SlackStandIn,
    dones,
    ledger_record,
    night_dir,
    raw_fits_bytes,
    readies,
    running_watcher,
    wait_for,
    watcher_settings,
    write_raw,
)

from gppy import naming  # noqa: E402
from gppy.messages import Event, NightPlan, NightReady  # noqa: E402
from gppy.notify import SlackNotifier  # noqa: E402
from gppy.runtime import PermanentError, StageService  # noqa: E402


def slack_for(stand_in: SlackStandIn) -> SlackNotifier:
    return SlackNotifier(stand_in.token, "#pipeline", stand_in.base_url, max_tries=3, backoff_s=0.1)


async def test_slow_copy_is_queued_once_and_a_truncated_fits_delays_it(settings):
    s = watcher_settings(settings, quiet_period_s=3.0, poll_interval_s=0.3)
    d = night_dir(s, "2025-01-02_gain2750")
    nid = naming.night_id(UNIT, d)
    async with running_watcher(s, use_events=True) as svc:
        for i in range(5):  # copied file by file, each gap well inside the quiet period
            write_raw(d, i)
            await asyncio.sleep(0.25)
        part = write_raw(d, 5, truncate_to=0.5)  # the last file is still being written
        rec = await wait_for(lambda: _waiting_on_incomplete(s, nid), 60, "the scanner to see a stable but "
                             "incomplete night")
        assert rec["state"] == "waiting" and part.name in rec["note"]
        assert await readies(s, nid) == []
        part.write_bytes(raw_fits_bytes(5))  # copy finished
        evs = await wait_for(lambda: readies(s, nid), 60, "the night to be queued")
        scans = svc.scanner.scans
        await wait_for(lambda: svc.scanner.scans >= scans + 10, 60, "ten more scans")
        assert len(await readies(s, nid)) == 1
    ev = evs[0]
    assert (ev.lane, ev.attempt, ev.night_dir, ev.unit) == ("survey", 1, str(d), UNIT)
    rec = await ledger_record(s, nid)
    total = sum(p.stat().st_size for p in d.iterdir())
    assert rec["state"] == "queued" and rec["snapshot"] == {"size": total, "count": 6, "fits": 6}


async def _waiting_on_incomplete(s, nid):
    rec = await ledger_record(s, nid)
    return rec if rec and "incomplete FITS" in rec.get("note", "") else None


class RecordingCalib(StageService):
    """Stands in for calib: records the order of the nights it takes, plans no frame."""

    name = "calib"
    consumes = ["night.ready"]
    order: list[str] = []

    async def handle(self, event: Event) -> list[Event]:
        self.order.append(event.night_id)
        return [NightPlan(night_id=event.night_id, unit=event.unit, lane=event.lane, night_dir=event.night_dir,
                          frames=[])]


async def test_too_night_arriving_later_overtakes_the_survey_night(settings):
    s = watcher_settings(settings)
    survey = night_dir(s, "2025-01-03_gain2750")
    too = night_dir(s, "2025-01-04_ToO_gain2750")
    sid, tid = naming.night_id(UNIT, survey), naming.night_id(UNIT, too)
    async with running_watcher(s) as svc:
        for i in range(3):
            write_raw(survey, i)
        await wait_for(lambda: readies(s, sid), 60, "the survey night to be queued")
        for i in range(3):  # the ToO night arrives while the survey night waits for calib
            write_raw(too, 10 + i)
        await wait_for(lambda: readies(s, tid), 60, "the ToO night to be queued")
        RecordingCalib.order = []
        calib = RecordingCalib(s)
        calib_task = asyncio.create_task(calib.serve())
        try:
            done = await wait_for(lambda: _both_done(s, sid, tid), 60, "both nights to end")
        finally:
            calib._stopping.set()
            await calib_task
        assert svc.ledger.cached(tid).state == "done"
    assert RecordingCalib.order == [tid, sid]  # calib took the ToO night first
    # both ended, each in its own lane (the order of the two night.done events is the
    # watcher's end-of-night work finishing, which may interleave)
    assert {d.night_id: d.lane for d in done} == {tid: "too", sid: "survey"}
    assert (await readies(s, tid))[0].lane == "too"
    rows = list(csv.reader(s.paths().unit_log(UNIT).open()))
    assert [r[0] for r in rows[1:]] == [str(too), str(survey)] and rows[1][3] == "No Light Frame"


async def _both_done(s, *nids):
    out = await dones(s)
    return out if {d.night_id for d in out} >= set(nids) else None


async def test_a_night_followed_to_its_end(settings):
    stand_in = SlackStandIn().up()
    s = watcher_settings(settings)
    d = night_dir(s, "2025-01-05_gain2750")
    for i in range(4):
        write_raw(d, i)
    nid = naming.night_id(UNIT, d)
    scratch = naming.scratch_dir(s.paths().path_scratch, UNIT, d)
    (scratch / "ldac").mkdir(parents=True)
    (scratch / "ldac" / "x.cat").write_text("scratch")
    try:
        async with running_watcher(s, notifier=slack_for(stand_in), recheck_interval_s=0.5) as svc, \
                Publisher(s) as pub:
            ready = (await wait_for(lambda: readies(s, nid), 60, "the night to be queued"))[0]
            sim = SimNight.make(s, ready, {"A": [0, 1, 2], "B": [3]})
            f0, f1, f2, f3 = sim.frames
            events = [sim.plan()]
            for f in (f0, f1, f3):
                events += sim.frame_events(f)
            events += [sim.calibrated(f2), sim.solved(f2, ok=False, reason="SCAMP: 3 matched stars < 15"),
                       sim.phot(f2.calib, "single", ok=False, reason="no WCS")]
            events += sim.visit_events("A")[:-1]
            events += [sim.stacked("B"), sim.phot(sim.stack_path("B"), "stack"), sim.differenced("B", ok=False)]
            await pub(*events)
            rec = await wait_for(lambda: _outstanding(s, nid, 1), 60, "all but one item to be reported")
            assert rec["state"] == "processing" and await dones(s, nid) == []
            await pub(sim.phot(sim.diff_path("A"), "difference"))
            done = (await wait_for(lambda: dones(s, nid), 60, "the night to end"))
            write_raw(d, 4)  # a late frame lands in the processed night
            changed = await wait_for(lambda: _changed(s, nid), 60, "the night to be flagged as changed")
            await svc.notifier.flush(10)
            assert svc.ledger.cached(nid).state == "done" and len(await readies(s, nid)) == 1
    finally:
        stand_in.down()
    assert changed["before"]["count"] == 4 and changed["now"]["count"] == 5
    assert sum("files changed after the night was queued (4 files" in t for t in stand_in.texts()) == 1
    assert len(done) == 1 and done[0].status == "done"
    summary = json.loads(Path(done[0].summary_path).read_text())
    assert summary["status"] == "done" and summary["frames"]["planned"] == 4
    assert summary["frames"]["photometry_ok"] == 3
    assert [f["path"] for f in summary["frames"]["failed"]] == [str(f2.calib)]
    assert summary["products"]["stacks"] == [str(sim.stack_path("A")), str(sim.stack_path("B"))]
    assert summary["products"]["differences"] == [str(sim.diff_path("A"))]
    assert list(summary["no_reference"]) == [str(sim.stack_path("B"))]
    assert list(summary["timings"]) == ["calib", "astrometry", "phot_single", "stack", "phot_stack", "subtract",
                                        "phot_difference"]
    assert summary["timings"]["astrometry"]["outputs"] == 4
    assert [f["stage"] for f in summary["failures"]] == ["astrometry"]
    # header snapshots of every image product (4 singles, 2 stacks, each with weight and mask; 1 difference)
    heads = sorted(Path(p).name for p in summary["products"]["headers"])
    assert len(heads) == 4 * 3 + 2 * 3 + 1
    head = (f0.calib.parent / "header" / (sim.diff_path("A").name[:-5] + ".head")).read_text()
    assert "PRODKIND= 'difference'" in head
    assert not scratch.exists()
    rows = list(csv.reader(s.paths().unit_log(UNIT).open()))
    assert rows[0] == ["date", "start", "end", "note"] and rows[1][0] == str(d) and rows[1][3] == "-"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d:\d\d:\d\d_\(KST\)", rows[1][2])
    rec = await ledger_record(s, nid)
    assert rec["state"] == "done" and rec["outstanding"] == 0 and rec["progress"]["stack"]["done"] == 2
    texts = stand_in.texts()
    assert texts[0].startswith("[gpPy/7DT] Start processing 7DT01 2025-01-05_gain2750 (survey): 4 frames")
    assert any("astrometry failed on " + f2.calib.name + ": SCAMP: 3 matched stars < 15" in t for t in texts)
    finish = [t for t in texts if "Processing complete" in t]
    assert len(finish) == 1 and "3/4 frames, 2 stacks, 1 differences" in finish[0] and "mins" in finish[0]
    assert all(m["channel"] == "#pipeline" for m in stand_in.messages)


async def _changed(s, nid):
    rec = await ledger_record(s, nid)
    return rec and rec.get("changed")


async def _outstanding(s, nid, n):
    rec = await ledger_record(s, nid)
    return rec if rec and rec.get("outstanding") == n else None


class FailingCalib(StageService):
    """Stands in for calib on a night it cannot process (the runtime reports and dead-letters)."""

    name = "calib"
    consumes = ["night.ready"]
    seen: list[int] = []

    async def handle(self, event: Event) -> list[Event]:
        self.seen.append(event.attempt)
        raise PermanentError("no bias frame in the night and none to borrow")


async def test_a_failing_night_is_retried_to_the_limit_reported_once_and_never_loops(settings):
    stand_in = SlackStandIn().up()
    s = watcher_settings(settings, night_max_attempts=3)
    d = night_dir(s, "2025-01-06_gain2750")
    for i in range(2):
        write_raw(d, i)
    nid = naming.night_id(UNIT, d)
    FailingCalib.seen = []
    calib = FailingCalib(s)
    calib_task = asyncio.create_task(calib.serve())
    try:
        async with running_watcher(s, notifier=slack_for(stand_in), stall_timeout_s=1.0) as svc:
            done = await wait_for(lambda: dones(s, nid), 90, "the night to fail")
            scans = svc.scanner.scans
            await wait_for(lambda: svc.scanner.scans >= scans + 10, 60, "ten more scans")
            await svc.check_stalled()
            assert [r.attempt for r in await readies(s, nid)] == [1, 2, 3]
            assert len(await dones(s, nid)) == 1
            await svc.notifier.flush(10)
            failed_msgs = [t for t in stand_in.texts() if "FAILED" in t]
            assert len(failed_msgs) == 1 and "after 3 attempt(s)" in failed_msgs[0]
            assert "no bias frame" in failed_msgs[0] and not any("Start" in t for t in stand_in.texts())
            # an operator re-queue starts a new run with a fresh budget of attempts
            await svc.requeue(nid)
            await wait_for(lambda: _n_dones(s, nid, 2), 90, "the re-queued night to fail again")
            assert [r.attempt for r in await readies(s, nid)] == [1, 2, 3, 4, 5, 6]
    finally:
        calib._stopping.set()
        await calib_task
        stand_in.down()
    assert FailingCalib.seen == [1, 2, 3, 4, 5, 6]
    assert [x.status for x in done] == ["failed"]
    rec = await ledger_record(s, nid)
    assert rec["state"] == "failed" and rec["run"] == 2 and rec["run_attempts"] == 3
    assert [h["outcome"] for h in rec["history"]] == ["failed"] * 6
    summary = json.loads(Path(rec["summary_path"]).read_text())
    assert summary["status"] == "failed" and "no bias frame" in summary["note"]
    rows = list(csv.reader(s.paths().unit_log(UNIT).open()))
    assert len(rows) == 3 and rows[1][3].startswith("Failed: calib: no bias frame")


async def _n_dones(s, nid, n):
    out = await dones(s, nid)
    return out if len(out) >= n else None


async def test_ad_hoc_night_with_a_filter_restriction_and_collapsed_failures(settings):
    """A night-ready event the watcher did not publish (``gppy process``) goes through the ledger;
    identical failures on many frames make one Slack message; a dead letter closes its frame."""
    stand_in = SlackStandIn().up()
    s = watcher_settings(settings, units=["7DT02"], night_max_attempts=3)  # the night's unit is not watched
    d = night_dir(s, "2025-01-07_gain2750")
    d.mkdir(parents=True)
    ready = NightReady(night_id=naming.night_id(UNIT, d), unit=UNIT, night_dir=str(d), attempt=1736000000,
                       filters=["m425"])
    try:
        async with running_watcher(s, notifier=slack_for(stand_in)) as svc, Publisher(s) as pub:
            sim = SimNight.make(s, ready, {"A": [0, 1, 2, 3, 4]})
            other = SimNight.make(s, ready, {"Z": [20, 21]}, filt="m500")
            plan = sim.plan()
            plan = NightPlan(**{**plan.model_dump(), "frames": plan.frames + other.plan().frames})
            await pub(ready, plan)
            frames = sim.frames
            evs = []
            for f in frames[:4]:
                evs += [sim.calibrated(f), sim.solved(f),
                        sim.phot(f.calib, "single", ok=False, reason=f"{f.calib}: {7 + frames.index(f)} stars < 15")]
            await pub(*evs)
            # frame 4: astrometry exhausts its retries (stage.failed then the dead letter, as the runtime does)
            cal4 = sim.calibrated(frames[4])
            await pub(cal4)
            await pub(svc.failed(cal4, "ToolError: scamp: timed out after 600 s", cal4.path).model_copy(
                update={"stage": "astrometry"}))
            await pub.dead_letter("astrometry", "ToolError: scamp: timed out after 600 s", cal4)
            done = await wait_for(lambda: dones(s, ready.night_id), 60, "the night to end")
            await svc.notifier.flush(10)
            rec = svc.ledger.cached(ready.night_id)
    finally:
        stand_in.down()
    assert done[0].status == "failed"  # no frame came through: failed at once, not retried
    assert [r.attempt for r in await readies(s, ready.night_id)] == [1736000000]
    assert rec.source == "adhoc" and rec.filters == ["m425"] and rec.attempt == 1736000000
    assert rec.progress["plan"] == {"frames": 5, "visits": 1, "rejected": 0, "skipped": 2}
    texts = stand_in.texts()
    phot_msgs = [t for t in texts if "phot failed on" in t]
    astro_msgs = [t for t in texts if "astrometry failed on" in t]
    assert len(phot_msgs) == 1 and "stars < 15" in phot_msgs[0]
    assert len(astro_msgs) == 1 and frames[4].calib.name in astro_msgs[0]
    summary = json.loads(Path(rec.summary_path).read_text())
    counts = {f["stage"]: f["count"] for f in summary["failures"]}
    assert counts == {"phot": 4, "astrometry": 1}
    assert summary["frames"]["skipped_by_restriction"] == 2


async def test_a_stalled_night_is_closed_with_its_missing_items(settings):
    s = watcher_settings(settings)
    d = night_dir(s, "2025-01-08_gain2750")
    for i in range(3):
        write_raw(d, i)
    nid = naming.night_id(UNIT, d)
    async with running_watcher(s, stall_timeout_s=1.0) as svc, Publisher(s) as pub:
        ready = (await wait_for(lambda: readies(s, nid), 60, "the night to be queued"))[0]
        sim = SimNight.make(s, ready, {"A": [0, 1, 2]})
        evs = [sim.plan()]
        for f in sim.frames[:2]:
            evs += sim.frame_events(f)
        evs += [sim.calibrated(sim.frames[2])]  # astrometry never reports frame 2
        await pub(*evs)
        done = await wait_for(lambda: dones(s, nid), 60, "the stall check to close the night")
        assert svc.ledger.cached(nid).outstanding == 1
    summary = json.loads(Path(done[0].summary_path).read_text())
    assert done[0].status == "done"
    assert summary["outstanding_at_end"] == [f"astrometry of {sim.frames[2].calib.name}"]


async def test_a_simulated_night_copied_in_chunks_is_queued_once_after_the_last_byte(settings, tmp_path):
    """A raw night from gppy.sim, copied the way rsync does it (each file grows in chunks)."""
    from gppy.sim import simulate

    simulate(tmp_path / "sim", unit=UNIT, night="2025-01-15", size=(256, 192), targets=1, filters=["m425"],
             references=False, extras=False, transients=False, seed=3)
    src = tmp_path / "sim" / "obsdata" / UNIT / "2025-01-15_gain2750"
    files = sorted(src.iterdir())
    s = watcher_settings(settings, quiet_period_s=3.0, poll_interval_s=0.3)
    d = night_dir(s, src.name)
    d.mkdir(parents=True)
    nid = naming.night_id(UNIT, d)
    async with running_watcher(s) as svc:
        for f in files:
            data = f.read_bytes()
            with open(d / f.name, "wb") as out:
                for k in range(3):
                    out.write(data[k * len(data) // 3:(k + 1) * len(data) // 3])
                    out.flush()
                    await asyncio.sleep(0.05)
        evs = await wait_for(lambda: readies(s, nid), 60, "the night to be queued")
        scans = svc.scanner.scans
        await wait_for(lambda: svc.scanner.scans >= scans + 5, 60, "five more scans")
        assert len(await readies(s, nid)) == 1
        rec = svc.ledger.cached(nid)
    assert evs[0].night_dir == str(d)
    assert rec.snapshot == {"size": sum(f.stat().st_size for f in files), "count": len(files), "fits": len(files)}


async def test_the_two_reports_of_a_night_failure_count_once_in_either_order(settings):
    """A stage that gives up sends a stage.failed and a dead letter, which reach the watcher on
    different consumers in either order, possibly after it has moved on to the next attempt."""
    from gppy.messages import StageFailed

    s = watcher_settings(settings, night_max_attempts=3)
    d = night_dir(s, "2025-01-09_gain2750")
    write_raw(d, 0)
    nid = naming.night_id(UNIT, d)
    reason = "RuntimeError: master bias: no frame"
    async with running_watcher(s) as svc, Publisher(s) as pub:
        r1 = (await wait_for(lambda: readies(s, nid), 60, "attempt 1"))[0]
        sf = StageFailed(night_id=nid, unit=UNIT, stage="calib", item_path=str(d), reason=reason)
        await pub.dead_letter("calib", reason, r1)  # the dead letter first
        r2 = (await wait_for(lambda: _n_readies(s, nid, 2), 60, "attempt 2"))[1]
        await pub(sf)  # its twin arrives after the retry was published: not a failure of attempt 2
        await wait_for(lambda: _night_failures(svc, nid, 1, both=True), 60, "the twin to be paired")
        # attempt 2 (another reason: an identical stage.failed would be de-duplicated by JetStream)
        reason2 = reason + " (attempt 2)"
        await pub(sf.model_copy(update={"reason": reason2}))  # the stage.failed first this time
        r3 = (await wait_for(lambda: _n_readies(s, nid, 3), 60, "attempt 3"))[2]
        await pub.dead_letter("calib", reason2, r2)
        await wait_for(lambda: _night_failures(svc, nid, 2, both=True), 60, "the second twin to be paired")
        await pub(sf)  # attempt 3's stage.failed: identical to attempt 1's, swallowed by JetStream
        await pub.dead_letter("calib", reason, r3)  # so the dead letter alone ends the night
        done = await wait_for(lambda: dones(s, nid), 60, "the night to fail")
    assert [r.attempt for r in await readies(s, nid)] == [1, 2, 3]
    assert [x.status for x in done] == ["failed"] and len(await dones(s, nid)) == 1


def _night_failures(svc, nid, n, both=False):
    rec = svc.ledger.cached(nid)
    fails = rec.night_failures if rec else []
    return len(fails) == n and (not both or all(e["sf"] and e["dlq"] for e in fails))


async def _n_readies(s, nid, n):
    out = await readies(s, nid)
    return out if len(out) >= n else None
