"""The subtract service: real FITS files, a real nats-server and the service as a process.

A simulated stack (with weight and mask, the header keys of the phot stage) and a 7DT reference
on another grid (0.6"/px, rotated) are written under the data roots; ``phot.done`` events go
in, ``diff.done`` events and the products come out. Checked against the simulation's truth and
the naming contract.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

sys.path.insert(0, str(Path(__file__).parent))
from conftest_subtract import linear_fwhm, simulate_pair, source_free  # noqa: E402

from gppy import bus  # noqa: E402
from gppy.config import Settings  # noqa: E402
from gppy.messages import DifferenceDone, PhotometryDone, parse  # noqa: E402
from gppy.naming import ProductDirs, convolved_reference_name, flag_of, weight_of  # noqa: E402
from gppy_subtract.service import SubtractService  # noqa: E402

SHAPE = (700, 900)
DATE = "2025-01-10T03:04:05.600"


def tan_wcs(shape, scale_arcsec, rot_deg=0.0, crval=(150.0, 2.0)):
    h, w = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = [(w + 1) / 2.0, (h + 1) / 2.0]
    s = scale_arcsec / 3600.0
    c, sn = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    wcs.wcs.cd = np.array([[-s * c, s * sn], [s * sn, s * c]])
    return wcs


@pytest.fixture(scope="module")
def case():
    w_sci = tan_wcs(SHAPE, 0.505)
    ref_shape = (1000, 1000)
    w_ref = tan_wcs(ref_shape, 0.6, rot_deg=-25.0, crval=(150.0 - 3 / 3600, 2.0 + 2 / 3600))

    def to_ref(x, y):
        xr, yr = w_ref.world_to_pixel_values(*w_sci.pixel_to_world_values(x, y))
        return np.asarray(xr), np.asarray(yr)

    pair = simulate_pair(seed=21, shape=SHAPE, n_stars=1100, sci_fwhm=linear_fwhm(4.3, shape=SHAPE),
                         ref_fwhm=linear_fwhm(3.0, shape=SHAPE),
                         ref_grid={"shape": ref_shape, "to_ref": to_ref, "pix_ratio": 0.6 / 0.505})
    return pair, w_sci, w_ref


def write_inputs(pair, w_sci, w_ref, paths, obj="T01234", filt="m625"):
    """The science stack and its reference as the stack/phot stages and ref_frame provide them."""
    folder = Path(paths.path_processed) / obj / "7DT01" / filt
    folder.mkdir(parents=True, exist_ok=True)
    sci = folder / f"calib_7DT01_{obj}_20250110_030405_{filt}_300.com.fits"
    h = w_sci.to_header()
    h.update({"OBJECT": obj, "FILTER": filt, "DATE-OBS": DATE, "EGAIN": pair.sci.egain,
              "SATURATE": pair.sci.saturate, "ZP_AUTO": 25.123, "EZP_AUTO": 0.011, "SEEING": 2.17,
              "SKYSIG": 8.0, "SKYVAL": 0.0, "UL5_1": 21.9, "BUNIT": "ADU"})
    fits.writeto(sci, pair.sci.data, h)
    fits.writeto(weight_of(sci), np.where(pair.sci.var > 0, 1 / np.where(pair.sci.var > 0, pair.sci.var, 1), 0)
                 .astype(np.float32), w_sci.to_header())
    fits.writeto(flag_of(sci), pair.sci.mask, w_sci.to_header())
    rdir = Path(paths.ref_frame) / filt
    rdir.mkdir(parents=True, exist_ok=True)
    ref = rdir / f"ref_7DT_{obj}_20240101_000000_{filt}_3600.com.fits"
    rh = w_ref.to_header()
    rh.update({"OBJECT": obj, "FILTER": filt, "EGAIN": pair.ref.egain, "SATURATE": pair.ref.saturate})
    fits.writeto(ref, pair.ref.data, rh)
    fits.writeto(weight_of(ref), np.where(pair.ref.var > 0, 1 / np.where(pair.ref.var > 0, pair.ref.var, 1), 0)
                 .astype(np.float32), w_ref.to_header())
    fits.writeto(flag_of(ref), pair.ref.mask, w_ref.to_header())
    return sci, ref


def phot_done(path, kind="stack", ok=True):
    return PhotometryDone(night_id="7DT01_2025-01-09_gain2750", unit="7DT01", image_path=str(path), image_kind=kind,
                          ok=ok)


async def publish(settings, events):
    nc = await bus.connect(settings, "test")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    for ev in events:
        await bus.publish(js, ev)
    await nc.drain()


async def diff_events(settings):
    nc = await bus.connect(settings, "test-read")
    js = nc.jetstream()
    out = []
    try:
        sub = await js.subscribe("gppy.*.diff.done", ordered_consumer=True)
    except Exception:
        await nc.drain()
        return out
    while True:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except Exception:
            break
        out.append(parse(msg.data))
    await nc.drain()
    return out


def test_service_over_nats(case, settings, tmp_path):
    pair, w_sci, w_ref = case
    paths = settings.paths()
    sci, ref = write_inputs(pair, w_sci, w_ref, paths)
    # a stack of another object, with no reference
    other = Path(str(sci).replace("T01234", "T09999"))
    other.parent.mkdir(parents=True, exist_ok=True)
    oh = fits.getheader(sci)
    oh["OBJECT"] = "T09999"
    fits.writeto(other, pair.sci.data, oh)
    env = dict(os.environ, GPPY_CONFIG=str(settings.config), GPPY_NATS_URL=settings.nats_url, GPPY_GPU="off",
               GPPY_SUBTRACT_NREGIONS="[2,2]", GPPY_LOG_JSON="false", GPPY_ACK_WAIT_S="60",
               GPPY_HEARTBEAT_S="2")
    log = open(tmp_path / "subtract.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gppy_subtract"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(publish(settings, [phot_done(sci), phot_done(other), phot_done(sci, kind="single"),
                                       phot_done(sci, ok=False), phot_done(sci, kind="difference")]))
        deadline = time.monotonic() + 150
        events = []
        while time.monotonic() < deadline and len(events) < 2:
            time.sleep(2)
            events = asyncio.run(diff_events(settings))
        time.sleep(3)   # anything produced for the ignored events would show up now
        events = asyncio.run(diff_events(settings))
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    assert len(events) == 2, (tmp_path / "subtract.log").read_text()[-3000:]
    by_obj = {e.object: e for e in events}
    none = by_obj["T09999"]
    assert isinstance(none, DifferenceDone) and not none.ok and none.reason == "no reference"
    done = by_obj["T01234"]
    assert done.ok, done.reason
    assert done.filter == "m625" and done.reference_path == str(ref) and done.science_path == str(sci)
    transient = sci.parent / "transient"
    stem_ = sci.name[:-5]
    assert done.path == str(transient / f"{stem_}.subt.fits")
    assert done.noise_path == str(transient / f"{stem_}.subt.noise.fits")
    assert done.mask_path == str(transient / f"{stem_}.subt.mask.fits")
    # the reference was convolved (it is sharper): v1's name with the science date and time
    assert done.conv_path == str(convolved_reference_name(ref, DATE, ProductDirs(sci.parent)))
    assert Path(done.conv_path).name == "ref_7DT_T01234_20250110_030405_m625_3600.com.conv.fits"

    diff, h = fits.getdata(done.path, header=True)
    noise = fits.getdata(done.noise_path)
    mask = fits.getdata(done.mask_path)
    assert mask.dtype.kind == "u" and mask.dtype.itemsize == 2
    # science keys carried over, quality keys, provenance
    for key, value in (("ZP_AUTO", 25.123), ("SEEING", 2.17), ("EGAIN", pair.sci.egain), ("OBJECT", "T01234"),
                       ("UL5_1", 21.9), ("DATE-OBS", DATE)):
        assert h[key] == value
    assert h["SUBKSIZE"] == 2 * h["SUBKHW"] + 1 and h["SUBKHW"] >= 4
    assert h["SUBNSTMP"] >= 40 and h["SUBNREG"] == 4 and h["SUBCONV"] == "REFERENCE"
    assert 0.7 < h["SUBCHI2"] < 1.5 and 0.95 < h["SUBRNR"] < 1.10
    assert h["SUBKSUM"] == pytest.approx(1 / pair.ref_scale, rel=0.01)
    assert h["PIPESTG"] == "subtract" and h["PROVIN01"] == sci.name and h["PROVIN02"] == ref.name
    pix = np.array([[0.0, 0.0], [899.0, 699.0], [450.3, 120.7]])
    assert np.allclose(WCS(h).celestial.all_pix2world(pix, 0), w_sci.all_pix2world(pix, 0), atol=1e-10, rtol=0)
    # masked pixels are 0 in the difference and the noise; the noise is positive elsewhere
    good = mask == 0
    assert np.all(diff[~good] == 0) and np.all(noise[~good] == 0) and np.all(noise[good] > 0)
    assert sorted(p.name for p in transient.iterdir()) == sorted(
        [f"{stem_}.subt.fits", f"{stem_}.subt.noise.fits", f"{stem_}.subt.mask.fits", Path(done.conv_path).name])
    free = source_free(pair) & good
    assert 0.95 < np.std(diff[free] / noise[free]) < 1.10
    # the reprojection is cached next to the reference, with its noise and mask
    cached = sorted(p.name for p in (ref.parent / "resampled").iterdir())
    assert len(cached) == 3 and all(n.startswith(ref.name[:-5]) for n in cached)
    assert any(n.endswith(".resamp.noise.fits") for n in cached)
    assert any(n.endswith(".resamp.mask.fits") for n in cached)


def test_reruns_reuse_products_and_ignore_other_events(case, data_root):
    pair, w_sci, w_ref = case
    settings = Settings(config=data_root, gpu="off", subtract_nregions=(2, 2), log_json=False)
    svc = SubtractService(settings)
    sci, ref = write_inputs(pair, w_sci, w_ref, settings.paths())
    for ignored in (phot_done(sci, kind="single"), phot_done(sci, ok=False), phot_done(sci, kind="difference")):
        assert asyncio.run(svc.handle(ignored)) == []
    first = asyncio.run(svc.handle(phot_done(sci)))
    assert len(first) == 1 and first[0].ok
    products = [Path(first[0].path), Path(first[0].noise_path), Path(first[0].mask_path), Path(first[0].conv_path)]
    mtimes = [p.stat().st_mtime_ns for p in products]
    again = asyncio.run(svc.handle(phot_done(sci)))
    assert len(again) == 1 and again[0].ok and again[0].path == first[0].path
    assert [p.stat().st_mtime_ns for p in products] == mtimes          # reused, not recomputed
    # singles are subtracted only when asked to
    single = SubtractService(Settings(config=data_root, gpu="off", subtract_singles=True,
                                      subtract_nregions=(2, 2), log_json=False))
    assert single.wanted(phot_done(sci, kind="single"))
    assert not svc.wanted(phot_done(sci, kind="single"))


def test_bad_science_is_reported_not_retried(data_root, tmp_path):
    settings = Settings(config=data_root, gpu="off", log_json=False)
    svc = SubtractService(settings)
    bad = Path(settings.paths().path_processed) / "T1" / "7DT01" / "r" / "calib_7DT01_T1_20250110_030405_r_300.com.fits"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    out = asyncio.run(svc.handle(phot_done(bad)))
    kinds = sorted(e.kind for e in out)
    assert kinds == ["diff.done", "stage.failed"]
    diff = next(e for e in out if e.kind == "diff.done")
    assert not diff.ok and str(bad) in diff.reason
