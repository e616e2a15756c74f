"""The stack service with a real nats-server and two replica processes.

A night of six visits (60-s frames, a 300-s series, a one-frame visit, a visit with one
failed frame, a visit whose frames all failed, a visit whose files are unusable) is announced by its plan and the frames'
phot.done events in a shuffled order (some frames before the plan, one frame reported twice);
two stack replicas must produce each visit's stack exactly once. Then a deep stack across
three nights is requested through ``gppy deep-stack --as-reference``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from gppy import bus
from gppy.config import Settings
from gppy.messages import NightPlan, PhotometryDone, PlannedFrame, parse
from gppy.naming import ProductDirs
from gppy.visits import FrameInfo, group_visits

sys.path.insert(0, str(Path(__file__).parent))
from conftest_stack import aperture_sums, clean_stars, make_frames  # noqa: E402

UNIT = "7DT07"
STACK_SIZE = (900, 700)
SHAPE = (600, 800)


def start_replica(settings: Settings, log: Path) -> subprocess.Popen:
    env = dict(os.environ, GPPY_CONFIG=str(settings.config), GPPY_NATS_URL=settings.nats_url,
               GPPY_STACK_SIZE=json.dumps(list(STACK_SIZE)), GPPY_LOG_JSON="false", GPPY_ACK_WAIT_S="30",
               GPPY_HEARTBEAT_S="2", GPPY_MAX_DELIVER="3")
    return subprocess.Popen([sys.executable, "-m", "gppy_stack"], env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


async def _publish(settings: Settings, events) -> None:
    nc = await bus.connect(settings, "test-publisher")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    for ev in events:
        await bus.publish(js, ev)
    await nc.drain()


async def _read(settings: Settings, subject: str) -> list:
    nc = await bus.connect(settings, "test-reader")
    js = nc.jetstream()
    out = []
    sub = await js.subscribe(subject, ordered_consumer=True)
    while True:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except Exception:
            break
        out.append(parse(msg.data))
    await nc.drain()
    return out


async def _idle(settings: Settings, durable: str) -> bool:
    nc = await bus.connect(settings, "test-info")
    try:
        info = await nc.jetstream().consumer_info(settings.stream, durable)
        return info.num_pending == 0 and info.num_ack_pending == 0
    except Exception:
        return False
    finally:
        await nc.drain()


@pytest.fixture
def stack_settings(nats_server, data_root) -> Settings:
    return Settings(config=data_root, nats_url=nats_server.url, log_json=False)


def frames_of_night(processed: Path) -> dict:
    """Six visits of one night; returns the truths keyed by a label."""
    d = ProductDirs.of(processed, "T90001", UNIT, "m650").base
    d2 = ProductDirs.of(processed, "T90002", UNIT, "m650").base
    d3 = ProductDirs.of(processed, "T90002", UNIT, "r").base
    d4 = ProductDirs.of(processed, "T90001", UNIT, "r").base
    common = dict(shape=SHAPE, unit=UNIT, nstars=40, cosmics=10)
    unusable = make_frames(d4, n=2, filt="r", start="2025-01-02T04:30:00", seed=6, **common)
    for p in unusable.paths:  # photometry said ok, but the files have no WCS
        with fits.open(p, mode="update") as hd:
            for key in ("CTYPE1", "CTYPE2"):
                del hd[0].header[key]
    return {
        "unusable": unusable,
        "60s": make_frames(d, n=3, start="2025-01-02T03:00:00", seed=1, **common),
        "300s": make_frames(d, n=3, exptimes=[300.0] * 3, gaps_s=[25.0] * 3, start="2025-01-02T03:20:00",
                            seed=2, **common),
        "single": make_frames(d, n=1, exptimes=[45.0], start="2025-01-02T04:00:00", seed=3, **common),
        "one-failed": make_frames(d2, n=3, exptimes=[45.0] * 3, obj="T90002", ra0=151.28,
                                  start="2025-01-02T03:00:00", seed=4, **common),
        "all-failed": make_frames(d3, n=2, obj="T90002", filt="r", ra0=151.28, start="2025-01-02T03:10:00",
                                  seed=5, **common),
    }


def test_two_replicas_stack_each_visit_exactly_once_in_any_order(stack_settings, tmp_path):
    settings = stack_settings
    paths = settings.paths()
    night_dir = paths.path_obsdata / UNIT / "2025-01-01_gain2750"
    night_dir.mkdir(parents=True)
    night_id = f"{UNIT}_{night_dir.name}"
    truths = frames_of_night(paths.path_processed)
    infos = [FrameInfo(str(p), h["OBJECT"], h["FILTER"], h["DATE-OBS"], h["EXPTIME"])
             for t in truths.values() for p, h in zip(t.paths, t.headers, strict=True)]
    visits = group_visits(infos, settings.visit_gap_s)
    assert len(visits) == 6
    visit_of = {f.key: v for v, fs in visits.items() for f in fs}
    plan = NightPlan(night_id=night_id, unit=UNIT, night_dir=str(night_dir), frames=[
        PlannedFrame(raw_path=str(night_dir / f"raw{i}.fits"), calib_path=f.key, object=f.object, filter=f.filter,
                     exptime=f.exptime, date_obs=f.date_obs, visit=visit_of[f.key]) for i, f in enumerate(infos)])
    failed = {str(truths["one-failed"].paths[1])} | {str(p) for p in truths["all-failed"].paths}
    events = [PhotometryDone(night_id=night_id, unit=UNIT, image_path=f.key, image_kind="single",
                             ok=f.key not in failed, reason="astrometry failed" if f.key in failed else "")
              for f in infos]
    # the same frame reported again (a redelivery upstream), and a stack's phot.done (ignored)
    events.append(PhotometryDone(night_id=night_id, unit=UNIT, image_path=infos[0].key, image_kind="single",
                                 reason="reported twice"))
    events.append(PhotometryDone(night_id=night_id, unit=UNIT, image_path=infos[0].key, image_kind="stack"))
    random.Random(7).shuffle(events)
    events.insert(len(events) // 2, plan)  # half of the frames are done before the plan arrives

    logs = [tmp_path / "replica-a.log", tmp_path / "replica-b.log"]
    replicas = [start_replica(settings, log) for log in logs]
    try:
        asyncio.run(_publish(settings, events))
        wait_until(lambda: asyncio.run(_idle(settings, "stack-survey"))
                   and len(asyncio.run(_read(settings, "gppy.survey.stack.done"))) >= 4, 240,
                   "the stack replicas to handle every message")
        done = asyncio.run(_read(settings, "gppy.survey.stack.done"))
        failures = asyncio.run(_read(settings, "gppy.survey.stage.failed.*"))
    finally:
        for p in replicas:
            p.terminate()
            p.wait(20)
    text = "\n".join(log.read_text() for log in logs)

    # each buildable visit exactly once, the all-failed one reported once
    by_visit = {}
    for ev in done:
        by_visit.setdefault(ev.visit, []).append(ev)
    label_of = {visit_of[str(t.paths[0])]: label for label, t in truths.items()}
    assert sorted(label_of[v] for v in by_visit) == ["300s", "60s", "one-failed", "single"], text[-3000:]
    assert all(len(evs) == 1 for evs in by_visit.values())
    built = [line for line in text.splitlines() if "stacked from" in line]
    assert len(built) == 4, built  # one build per visit across both replicas
    assert [f.stage for f in failures] == ["stack", "stack"]  # each names its visit, once
    reasons = {label_of[f.item_path]: f.reason for f in failures}
    assert set(reasons) == {"all-failed", "unusable"}
    assert "no frame of it was processed successfully" in reasons["all-failed"]
    assert "no usable input" in reasons["unusable"] and "not solved" in reasons["unusable"]

    for visit, (ev,) in by_visit.items():
        truth = truths[label_of[visit]]
        expected_inputs = [str(p) for p in truth.paths if str(p) not in failed]
        assert sorted(ev.input_paths) == sorted(expected_inputs)
        assert ev.single == (len(expected_inputs) == 1)
        h = fits.getheader(ev.path)
        assert Path(ev.weight_path).exists() and Path(ev.mask_path).exists()
        assert h["NCOMBINE"] == len(expected_inputs)
        assert h["EXPTIME"] == sum(x["EXPTIME"] for p, x in zip(truth.paths, truth.headers, strict=True)
                                   if str(p) not in failed)
        assert (h["NAXIS1"], h["NAXIS2"]) == STACK_SIZE
        assert h["GRIDSRC"] == "skygrid" and h["TILE"] == ev.object
        assert Path(ev.path).parent == ProductDirs.of(paths.path_processed, ev.object, UNIT, ev.filter).base
        assert ev.lane == "survey" and ev.night_id == night_id
    single = [ev for ev in done if ev.single]
    assert len(single) == 1 and fits.getheader(single[0].path)["SINGLE"] is True
    assert {Path(ev.path).name.rsplit("_", 1)[1] for ev in done} == {"180.com.fits", "900.com.fits",
                                                                     "45.com.fits", "90.com.fits"}


def test_deep_stack_of_several_nights_becomes_a_7dt_reference(stack_settings, tmp_path):
    from gppy.cli import main as gppy_main

    settings = stack_settings
    paths = settings.paths()
    base = ProductDirs.of(paths.path_processed, "T90001", UNIT, "m650").base
    truths = []
    seeing = {}
    for k, day in enumerate(["2025-01-02", "2025-01-05", "2025-01-09"]):
        t = make_frames(base, n=2, shape=SHAPE, unit=UNIT, start=f"{day}T03:00:00", seed=60 + k, nstars=60,
                        cosmics=10, transparency=[1.0, 0.85], fwhm_px=[3.6 + 0.5 * k, 3.8 + 0.5 * k],
                        sky_e_per_s=3.0, mag_range=(14.3, 19.5),
                        stars=None if k == 0 else (truths[0].ra[:-1], truths[0].dec[:-1], truths[0].mag[:-1]))
        for p, fw in zip(t.paths, [3.6 + 0.5 * k, 3.8 + 0.5 * k], strict=True):
            with fits.open(p, mode="update") as hd:  # what the phot stage writes
                hd[0].header["SEEING"] = fw * 0.505
                hd[0].header["UL5_1"] = 20.0 - 0.1 * k
            seeing[str(p)] = fw * 0.505
        truths.append(t)
    replica = start_replica(settings, tmp_path / "replica.log")
    try:
        rc = gppy_main(["deep-stack", "T90001", "m650", "--as-reference", "--config", str(settings.config),
                        "--nats", settings.nats_url])
        assert rc == 0
        ref_dir = paths.ref_frame / "m650"
        wait_until(lambda: list(ref_dir.glob("ref_7DT_*.com.fits")), 180, "the reference")
        # a second request, only two nights, selected by seeing, as a deep stack (not a reference)
        rc = gppy_main(["deep-stack", "T90001", "m650", "--nights", "2025-01-01", "20250104", "--select",
                        "seeing", "--config", str(settings.config), "--nats", settings.nats_url])
        assert rc == 0
        deep_dir = ProductDirs.of(paths.path_processed, "T90001", "7DT", "m650").base
        wait_until(lambda: list(deep_dir.glob("calib_7DT_*.com.fits")), 180, "the deep stack")
        done = asyncio.run(_read(settings, "gppy.survey.stack.done"))
    finally:
        replica.terminate()
        replica.wait(20)

    (ref,) = [p for p in ref_dir.glob("ref_7DT_*.com.fits")]
    assert fnmatch.fnmatch(ref.name, "ref_7DT_T90001_*_*_m650_*.fits")  # what v1's subtraction looks for
    assert ref.name.endswith("_m650_360.com.fits")  # total EXPTIME of 6 x 60 s
    h = fits.getheader(ref)
    assert h["NCOMBINE"] == 6 and h["EXPTIME"] == 360.0 and h["GRIDSRC"] == "skygrid"
    assert (ref_dir / (ref.name[:-5] + ".weight.fits")).exists()
    assert (ref_dir / (ref.name[:-5] + ".mask.fits")).exists()
    img, w = fits.getdata(ref), fits.getdata(ref_dir / (ref.name[:-5] + ".weight.fits"))
    m = fits.getdata(ref_dir / (ref.name[:-5] + ".mask.fits"))
    t0 = truths[0]
    x, y = WCS(h).all_world2pix(t0.ra, t0.dec, 0)
    expected = 10 ** (-0.4 * (t0.mag - h["STKZP"]))
    s, pred, ok = aperture_sums(img, x, y, 10, 18, 32, w)
    clean = ok & clean_stars(m, w, x, y)
    err = np.sqrt(pred + expected / h["EGAIN"])
    good = clean & (err / expected < 0.0033)  # 3 sigma < 1 %
    assert good.sum() >= 5
    assert np.all(np.abs(s[good] / expected[good] - 1) < 0.01)
    chi = (s - expected) / err
    assert abs(chi[clean].std() - 1) < 3 / np.sqrt(2 * clean.sum())
    # the reference is not announced as a new science stack; the deep stack is
    assert [ev.visit for ev in done] == ["deep"]
    (deep,) = [ev for ev in done]
    hd = fits.getheader(deep.path)
    # nights 2025-01-01 and 2025-01-04 (local dates of the first two UTC dates), best half by seeing
    chosen = sorted(deep.input_paths)
    two_nights = [str(p) for t in truths[:2] for p in t.paths]
    best = sorted(two_nights, key=lambda p: seeing[p])[:2]
    assert chosen == sorted(best) and hd["NCOMBINE"] == 2
