"""CalibService.handle on simulated nights: events, products, borrowing, corrupt frames,
calibration-only nights, nights that cannot be calibrated, QC failures, determinism, and the
publication order on a real JetStream (plan first, then one frame.calibrated per frame)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy.messages import FrameCalibrated, NightPlan, NightReady, parse
from gppy.naming import flag_of, night_id, weight_of
from gppy_calib.service import CalibService

sys.path.insert(0, str(Path(__file__).parent))
from conftest_calib import (  # noqa: E402
    checksums,
    frame_truth,
    night_dir,
    settings_for,
    sim_night,
    truth_signal,
    write_config,
)

NIGHT_KW = dict(seed=5, calib=True, references=False)           # the same night as test_calib_sim
BORROW_KW = dict(seed=7, calib=False, targets=1, filters=["m425"], references=False, extras=False)


@pytest.fixture(scope="module")
def full_night(tmp_path_factory):
    return sim_night(tmp_path_factory, "calib-night", **NIGHT_KW)


@pytest.fixture(scope="module")
def borrow_night(tmp_path_factory):
    return sim_night(tmp_path_factory, "calib-borrow", **BORROW_KW)


def small_night(src: Path, dest: Path, keep) -> Path:
    """A night folder with the files of ``src`` for which ``keep(name)`` is true."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if keep(p.name):
            shutil.copy2(p, dest / p.name)
    return dest


def m425_subset(name: str) -> bool:
    """Biases, 100 s darks, m425 flats and the 100 s m425 science frames."""
    if "_BIAS_" in name or ("_DARK_" in name and "_100.0s_" in name) or "_FLAT_m425_" in name:
        return True
    return "_m425_" in name and "_100.0s_" in name and "_FLAT_" not in name and "_DARK_" not in name


def service(cfg: Path, **overrides) -> CalibService:
    return CalibService(settings_for(cfg, **overrides))


def ready(ndir: Path, **kw) -> NightReady:
    return NightReady(night_id=night_id("7DT01", ndir), unit="7DT01", night_dir=str(ndir), **kw)


async def test_plan_first_then_one_event_per_frame_with_products(full_night, tmp_path):
    ndir = small_night(night_dir(full_night), tmp_path / "obs" / "2025-01-15_gain2750", m425_subset)
    before = checksums(ndir)
    cfg = write_config(tmp_path, full_night)
    out = await service(cfg).handle(ready(ndir))
    plan = out[0]
    assert isinstance(plan, NightPlan) and plan.night_dir == str(ndir)
    assert len(plan.frames) == 6 and not plan.rejected and not plan.borrowed
    events = out[1:]
    assert len(events) == 6 and all(isinstance(e, FrameCalibrated) for e in events)
    planned = {f.raw_path: f for f in plan.frames}
    for ev in events:
        f = planned[ev.raw_path]
        assert ev.path == f.calib_path and ev.visit == f.visit and ev.object == f.object
        assert Path(ev.path).exists() and ev.weight_path == str(weight_of(ev.path))
        assert ev.mask_path == str(flag_of(ev.path)) and Path(ev.mask_path).exists()
        assert ev.filter == "m425" and ev.exptime == 100.0
        assert parse(ev.to_bytes()) == ev                         # a valid message
    assert len({f.visit for f in plan.frames}) == 2                 # two targets, one visit each
    assert checksums(ndir) == before                                # raw files untouched
    archived = sorted(p.name for p in (tmp_path / "mframe" / "7DT01").rglob("*.fits"))
    assert len(archived) == 3 and any(n.endswith("-nm425.fits") for n in archived)


async def test_events_are_published_in_order_and_deduplicated(full_night, tmp_path, nats_server):
    import nats

    ndir = small_night(night_dir(full_night), tmp_path / "obs" / "2025-01-15_gain2750",
                       lambda n: m425_subset(n) and "_SIMF01_" not in n)
    cfg = write_config(tmp_path, full_night)
    svc = service(cfg, nats_url=nats_server.url)
    await svc.connect()
    try:
        out = await svc.handle(ready(ndir))
        for ev in out:                       # what the runtime does with the returned events
            await svc.publish(ev)
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        sub = await js.pull_subscribe("gppy.survey.>", durable="calib-test-probe", stream=svc.settings.stream)
        msgs = await sub.fetch(batch=50, timeout=5)
        kinds = [parse(m.data).kind for m in msgs]
        await nc.drain()
    finally:
        await svc.nc.drain()
    # published once each (the runtime's second publish is de-duplicated by message id)
    assert kinds == ["night.plan"] + ["frame.calibrated"] * 3


async def test_night_without_calibration_frames_borrows_from_the_archive(borrow_night, tmp_path):
    cfg = write_config(tmp_path, borrow_night, copy_archive=True)
    ndir = night_dir(borrow_night)
    out = await service(cfg).handle(ready(ndir))
    plan = out[0]
    assert len(plan.frames) == 3 and not plan.rejected
    archive = json.loads((borrow_night / "truth" / "night.json").read_text())["master_archive"]
    assert any("20250106" in a for a in archive) and any("20250112" in a for a in archive)
    # nearest in date: the masters of 3 days before (2025-01-12), not 9 days before
    assert plan.borrowed["bias"] == "20250112-zero.fits from 2025-01-12"
    assert plan.borrowed["dark 100"] == "100-20250112-dark.fits from 2025-01-12"
    assert plan.borrowed["flat m425"] == "20250112-nm425.fits from 2025-01-12"
    for ev in out[1:]:
        h = fits.getheader(ev.path)
        assert h["CALBORR"] == "bias,dark,flat" and h["BIASBORR"] and h["DARKBORR"] and h["FLATBORR"]
        assert h["BIASFILE"] == "20250112-zero.fits" and h["FLATDATE"] == "2025-01-12"
        assert any("borrowed flat: 20250112-nm425.fits from 2025-01-12" in str(c) for c in h["HISTORY"])
    # the borrowed masters calibrate the frame as well as tonight's would: compare with truth
    ev = out[1]
    data, weight, mask = fits.getdata(ev.path), fits.getdata(ev.weight_path), fits.getdata(ev.mask_path)
    raw = Path(ev.raw_path).name
    truth, untrue = truth_signal(borrow_night, raw, data.shape)
    ok = (mask == 0) & ~untrue
    sky = frame_truth(borrow_night, raw)["sky_adu"]
    egain = fits.getheader(ev.path)["EGAIN"]
    r = (data[ok] - truth[ok]) / np.sqrt(1 / weight[ok] + np.maximum(truth[ok] - sky, 0) / egain)
    assert abs(float(np.mean(r))) < 0.1 and 0.85 < float(np.std(r)) < 1.2


async def test_corrupt_and_unclassifiable_frames_are_reported_and_the_rest_reduced(full_night, tmp_path):
    ndir = small_night(night_dir(full_night), tmp_path / "obs" / "2025-01-15_gain2750", m425_subset)
    science = sorted(p for p in ndir.iterdir() if p.name.split("_")[3].startswith("T"))
    truncated, retyped, undated = science[0], science[1], science[2]
    truncated.write_bytes(truncated.read_bytes()[: 2880 * 50])
    with fits.open(retyped, mode="update") as h:
        h[0].header["IMAGETYP"] = "Focus"
    with fits.open(undated, mode="update") as h:
        del h[0].header["DATE-OBS"]
    (ndir / "empty.fits").write_bytes(b"")
    (ndir / "notes.fits").write_text("not a FITS file at all\n")
    cfg = write_config(tmp_path, full_night)
    out = await service(cfg).handle(ready(ndir))
    plan = out[0]
    assert "truncated" in plan.rejected[str(truncated)]
    assert "IMAGETYP 'Focus'" in plan.rejected[str(retyped)]
    assert "DATE-OBS" in plan.rejected[str(undated)]
    assert "empty" in plan.rejected[str(ndir / "empty.fits")]
    assert "not a readable FITS" in plan.rejected[str(ndir / "notes.fits")]
    assert len(plan.frames) == 3 and len(out) == 4                 # the SIMF01 frames
    assert all(isinstance(e, FrameCalibrated) and Path(e.path).exists() for e in out[1:])


async def test_calibration_only_night_refreshes_the_archive(full_night, tmp_path):
    ndir = small_night(night_dir(full_night), tmp_path / "obs" / "2025-01-15_gain2750",
                       lambda n: any(k in n for k in ("_BIAS_", "_DARK_", "_FLAT_r_")))
    cfg = write_config(tmp_path, full_night)
    out = await service(cfg).handle(ready(ndir))
    assert len(out) == 1 and out[0].frames == [] and out[0].rejected == {}
    names = sorted(p.name for p in (tmp_path / "mframe" / "7DT01").rglob("*.fits"))
    assert names == ["100-20250115-dark.fits", "20250115-zero.fits", "20250116-nr.fits", "300-20250115-dark.fits"]


async def test_night_without_calibration_and_empty_archive_is_rejected_not_retried(borrow_night, tmp_path):
    cfg = write_config(tmp_path, borrow_night, copy_archive=False)
    out = await service(cfg).handle(ready(night_dir(borrow_night)))
    plan = out[0]
    assert len(out) == 1 and plan.frames == []
    assert len(plan.rejected) == 3
    assert all("no master bias" in r and "none archived" in r for r in plan.rejected.values())


async def test_a_master_failing_qc_is_set_aside_and_the_previous_one_used(full_night, tmp_path):
    ndir = small_night(night_dir(full_night), tmp_path / "obs" / "2025-01-15_gain2750",
                       lambda n: m425_subset(n) and "_SIMF01_" not in n)
    cfg = write_config(tmp_path, full_night)
    # a previous bias, 100 ADU off (say the camera's offset setting changed since)
    bias = fits.getdata(full_night / "truth" / "calib" / "bias.fits") + 100.0
    prev = tmp_path / "mframe" / "7DT01" / "zero" / "20250110-zero.fits"
    prev.parent.mkdir(parents=True)
    fits.HDUList([fits.PrimaryHDU(bias.astype(np.float32)),
                  fits.ImageHDU(np.full(bias.shape, 4.0, np.float32), name="ERR")]).writeto(prev)
    out = await service(cfg).handle(ready(ndir))
    plan = out[0]
    assert (tmp_path / "mframe" / "7DT01" / "zero" / "rejected" / "20250115-zero.fits").exists()
    assert not (tmp_path / "mframe" / "7DT01" / "zero" / "20250115-zero.fits").exists()
    assert plan.borrowed["bias"].startswith("20250110-zero.fits from 2025-01-10 (tonight's master failed QC")
    h = fits.getheader(out[1].path)
    assert h["BIASFILE"] == "20250110-zero.fits" and h["BIASBORR"]
    rejected_hdr = fits.getheader(tmp_path / "mframe" / "7DT01" / "zero" / "rejected" / "20250115-zero.fits")
    assert rejected_hdr["QCSTAT"] == "fail" and rejected_hdr["QCREF"] == "20250110-zero.fits"


async def test_targets_and_filters_restrict_the_science_frames(full_night, tmp_path):
    ndir = small_night(night_dir(full_night), tmp_path / "obs" / "2025-01-15_gain2750", m425_subset)
    cfg = write_config(tmp_path, full_night)
    out = await service(cfg).handle(ready(ndir, targets=["SIMF01"], filters=["m425"]))
    assert {f.object for f in out[0].frames} == {"SIMF01"} and len(out) == 4


async def test_rerun_is_deterministic(full_night, tmp_path):
    ndir = small_night(night_dir(full_night), tmp_path / "obs" / "2025-01-15_gain2750",
                       lambda n: m425_subset(n) and "_SIMF01_" not in n)
    cfg = write_config(tmp_path, full_night)
    svc = service(cfg)
    first = await svc.handle(ready(ndir))
    data1 = {e.path: fits.getdata(e.path).copy() for e in first[1:]}
    second = await svc.handle(ready(ndir, attempt=2))
    assert [e.msg_id() for e in first[1:]] == [e.msg_id() for e in second[1:]]
    for e in second[1:]:
        assert np.array_equal(fits.getdata(e.path), data1[e.path])
    assert not list(Path(tmp_path / "processed").rglob("*.part"))


async def test_missing_night_folder_is_a_permanent_error(full_night, tmp_path):
    from gppy.fitsio import BadInputError

    cfg = write_config(tmp_path, full_night)
    with pytest.raises(BadInputError, match="does not exist"):
        await service(cfg).handle(ready(tmp_path / "obs" / "2025-01-20_gain2750"))

