"""The astrometry service end to end: a real nats-server, the service process, real tools.

Two calibrated frames are published; the one with a reference catalogue comes back solved
(its WCS good against the truth), the one of a field without any reference comes back as
``ok=False`` with the reason - and the service goes on (no retry loop, no dead letter).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy import bus
from gppy.config import Settings
from gppy.messages import FrameCalibrated, parse
from gppy.naming import ProductDirs, calib_name

_spec = importlib.util.spec_from_file_location("conftest_astrometry",
                                               Path(__file__).with_name("conftest_astrometry.py"))
ca = sys.modules.setdefault("conftest_astrometry", importlib.util.module_from_spec(_spec))
if not hasattr(ca, "make_field"):
    _spec.loader.exec_module(ca)

UNIT, FILT = "7DT01", "m625"
NIGHT = "7DT01_2024-02-29_gain2750"


def start_service(settings: Settings) -> subprocess.Popen:
    env = dict(os.environ, GPPY_CONFIG=str(settings.config), GPPY_NATS_URL=settings.nats_url,
               GPPY_ACK_WAIT_S="30", GPPY_HEARTBEAT_S="2", GPPY_MAX_DELIVER="2", GPPY_LOG_JSON="false")
    return subprocess.Popen([sys.executable, "-m", "gppy_astrometry"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


async def publish(settings: Settings, events) -> None:
    nc = await bus.connect(settings, "test-pub")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    for ev in events:
        await bus.publish(js, ev)
    await nc.drain()


async def collect(settings: Settings, subject: str, n: int, timeout: float) -> list:
    nc = await bus.connect(settings, "test-read")
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except Exception:
            continue
        out.append(parse(msg.data))
    await nc.drain()
    return out


def _frame(paths, fld, obj):
    dirs = ProductDirs.of(paths.path_processed, obj, UNIT, FILT)
    fld.header["OBJECT"] = obj
    name = calib_name(UNIT, obj, fld.header["DATE-OBS"], FILT, fld.header["EXPTIME"])
    img, w, m = ca.write_calibrated(fld, dirs.base, name=name)
    return FrameCalibrated(night_id=NIGHT, unit=UNIT, path=str(img), weight_path=str(w), mask_path=str(m),
                           raw_path=str(img), object=obj, filter=FILT, exptime=fld.header["EXPTIME"],
                           date_obs=fld.header["DATE-OBS"], visit="v1")


def test_service_solves_and_reports_failures(settings):
    paths = settings.paths()
    good = ca.make_field(seed=51, pointing_error_arcmin=(2.0, -3.0), angle_deg=1.0)
    ca.write_catalogue_csv(good, paths.path_refcat / "gaiaxp_dr3_synphot_T01234.csv")
    ev_good = _frame(paths, good, "T01234")
    ev_lonely = _frame(paths, ca.make_field(seed=52), "T09999")
    proc = start_service(settings)
    try:
        asyncio.run(publish(settings, [ev_good, ev_lonely]))
        solved = asyncio.run(collect(settings, "gppy.*.frame.solved", 2, timeout=120))
        failed = asyncio.run(collect(settings, "gppy.*.stage.failed.*", 1, timeout=2))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert len(solved) == 2, err.decode()[-3000:]
    by_obj = {ev.object: ev for ev in solved}
    ok, lonely = by_obj["T01234"], by_obj["T09999"]
    assert ok.ok and ok.nstars >= settings.astrometry_min_stars and 0 < ok.rms_arcsec < 0.3
    assert ok.path == ev_good.path and ok.visit == "v1" and ok.weight_path == ev_good.weight_path
    header = fits.getheader(ok.path)
    sel = (good.truth["snr"] > 20) & good.truth["inside"]
    dra, ddec = ca.wcs_residuals(header, good.truth[sel], "x", "y")
    assert np.sqrt(np.mean(dra ** 2)) < 0.1 and np.sqrt(np.mean(ddec ** 2)) < 0.1
    assert not lonely.ok and lonely.reason.startswith("missing reference catalogue for T09999")
    assert "RAPOLY0" not in fits.getheader(lonely.path)
    assert failed == []  # an unsolvable frame is an outcome, not a stage failure
    # the SCAMP reference was built and cached; the work files are in the night's scratch folder
    assert (paths.path_ref_scamp / "T01234.fits").exists()
    work = paths.path_scratch / UNIT / "2024-02-29_gain2750" / "astrometry"
    assert (work / Path(ok.path).name[:-5] / (Path(ok.path).name[:-5] + ".scamp.xml")).exists()
