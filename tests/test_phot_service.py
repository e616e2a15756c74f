"""The phot service end to end: a real nats-server, the real service process, real products."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from gppy import bus
from gppy.config import Settings
from gppy.messages import DifferenceDone, FrameSolved, StackDone, parse
from gppy.naming import ProductDirs, stack_name
from gppy_phot import synthetic as syn

_spec = importlib.util.spec_from_file_location("conftest_phot", Path(__file__).with_name("conftest_phot.py"))
cp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp)

UNIT, OBJ, FILT = "7DT01", "T00001", "m650"
NIGHT = "7DT01_2024-04-22_gain2750"


def start_service(settings: Settings) -> subprocess.Popen:
    env = dict(os.environ, GPPY_CONFIG=str(settings.config), GPPY_NATS_URL=settings.nats_url,
               GPPY_ACK_WAIT_S="30", GPPY_HEARTBEAT_S="2", GPPY_MAX_DELIVER="2", GPPY_LOG_JSON="false")
    return subprocess.Popen([sys.executable, "-m", "gppy_phot"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


async def publish(settings: Settings, events) -> None:
    nc = await bus.connect(settings, "test-pub")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    for ev in events:
        await bus.publish(js, ev)
    await nc.drain()


async def collect(settings: Settings, kind: str, n: int, timeout: float) -> list:
    nc = await bus.connect(settings, "test-read")
    js = nc.jetstream()
    sub = await js.subscribe(f"gppy.*.{kind}", ordered_consumer=True)
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


def test_service_photometry_and_failures(settings, tmp_path):
    paths = settings.paths()
    dirs = ProductDirs.of(paths.path_processed, OBJ, UNIT, FILT)
    fld = syn.make_field(900, 800, nstars=700, seed=21, fwhm_arcsec=2.4, beta=3.5)
    rng = np.random.default_rng(1)
    img = syn.add_noise(syn.noiseless_image(fld), fld.gain, fld.rdnoise, rng)
    single, sw, sm = cp.write_frame(dirs.base, fld, img, unit=UNIT, obj=OBJ)
    raw_bytes = single.read_bytes()
    # the stack holds two new point sources (S/N ~ 40) that the reference lacks
    tx, ty = np.array([300.4, 610.7]), np.array([250.2, 500.9])
    model = syn.noiseless_image(fld)
    tmodel = model + syn.render_sources(fld.shape, tx, ty, np.full(2, 3.0e4), fld.fwhm_px, fld.beta)
    img2 = syn.add_noise(tmodel, fld.gain, fld.rdnoise, rng)
    stack, kw, km = cp.write_frame(dirs.base, fld, img2, unit=UNIT, obj=OBJ,
                                   name=stack_name(UNIT, OBJ, "2024-04-23T03:30:00", FILT, 180))
    cp.write_refcat(paths.path_refcat, fld, obj=OBJ)
    # a frame of a field without a reference catalogue: reported, not retried for ever
    other = ProductDirs.of(paths.path_processed, "T09999", UNIT, FILT)
    lonely, lw, lm = cp.write_frame(other.base, fld, img, unit=UNIT, obj="T09999")
    # a frame whose weight map is not FITS: Source Extractor fails on every attempt; after the
    # retries the service still answers phot.done ok=False (nothing waits for it)
    broken, bw, bm = cp.write_frame(dirs.base, fld, img, unit=UNIT, obj=OBJ, date_obs="2024-04-23T03:40:00")
    bw.write_bytes(b"not a FITS file" * 300)

    common = dict(night_id=NIGHT, unit=UNIT, filter=FILT, run=2)
    events = [
        FrameSolved(path=str(single), weight_path=str(sw), mask_path=str(sm), object=OBJ, exptime=60.0,
                    date_obs="2024-04-23T03:28:04", visit="v1", **common),
        FrameSolved(path=str(dirs.base / "calib_failed.fits"), weight_path="", mask_path="", object=OBJ,
                    exptime=60.0, date_obs="2024-04-23T03:29:04", visit="v1", ok=False, reason="SCAMP: 3 stars",
                    **common),
        StackDone(path=str(stack), weight_path=str(kw), mask_path=str(km), object=OBJ, visit="v1",
                  input_paths=[str(single)], **common),
        DifferenceDone(science_path=str(stack), object=OBJ, ok=False, reason="no reference", **common),
        FrameSolved(path=str(lonely), weight_path=str(lw), mask_path=str(lm), object="T09999", exptime=60.0,
                    date_obs="2024-04-23T03:28:04", visit="v9", **common),
        FrameSolved(path=str(broken), weight_path=str(bw), mask_path=str(bm), object=OBJ, exptime=60.0,
                    date_obs="2024-04-23T03:40:00", visit="v2", **common),
    ]
    proc = start_service(settings)
    try:
        asyncio.run(publish(settings, events))
        done = asyncio.run(collect(settings, "phot.done", len(events), timeout=120))
        failed = asyncio.run(collect(settings, "stage.failed.*", 2, timeout=30))
        # the difference of the photometered stack (its header now has ZP_*, SEEING ...) against
        # a deeper reference made with the same PSF (perfectly PSF-matched)
        tdir = dirs.transient
        tdir.mkdir(parents=True, exist_ok=True)
        dpath = tdir / (stack.name[:-5] + ".subt.fits")
        sig_r = fld.sky_sigma / 3                       # a deeper reference
        conv = model + rng.normal(0, sig_r, model.shape)
        fits.writeto(dpath, (fits.getdata(stack) - conv).astype(np.float32), fits.getheader(stack))
        npath = tdir / (stack.name[:-5] + ".subt.noise.fits")
        fits.writeto(npath, np.sqrt(tmodel / fld.gain + (fld.rdnoise / fld.gain) ** 2 + sig_r**2).astype(np.float32))
        cpath = tdir / "ref_PS1_T00001_20240423_033000_m650_0.conv.fits"
        fits.writeto(cpath, (conv - fld.sky).astype(np.float32), fits.getheader(stack))
        asyncio.run(publish(settings, [DifferenceDone(science_path=str(stack), object=OBJ, path=str(dpath),
                                                      noise_path=str(npath), mask_path="", conv_path=str(cpath),
                                                      reference_path="", **common)]))
        done += [d for d in asyncio.run(collect(settings, "phot.done", len(events) + 1, timeout=120))
                 if d.image_kind == "difference" and d.ok]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    by_path = {(d.image_path, d.image_kind): d for d in done}
    assert all(d.run == 2 for d in done)       # the night's run travels with every answer
    diff = by_path[(str(dpath), "difference")]
    assert diff.ncandidates == 2, diff
    cands = Table.read(diff.candidates_path, format="ascii")
    cands = cands[cands["candidate"]]
    assert sorted(np.round(cands["X_IMAGE"] - 1)) == sorted(np.round(tx))
    assert set(cands["label"]) == {"new"}
    assert len(list(dirs.png_image.glob("*.png"))) == 6 and len(list(dirs.fits_image.glob("*.fits"))) == 6
    assert diff.catalogue_path.endswith(".subt.phot.cat")
    assert len(done) == len(events) + 1, [d.image_path for d in done]

    d = by_path[(str(single), "single")]
    assert d.ok and d.catalogue_path.endswith(".phot.cat")
    assert abs(d.zp - fld.zp) < 0.03 and 2.0 < d.seeing < 3.0 and 17 < d.depth < 21
    h = fits.getheader(single)
    for key in ("ZP_AUTO", "EZP_1", "UL5_1", "SEEING", "PEEING", "SKYSIG", "APER_1", "STDNUMB", "ZP_TOT"):
        assert key in h
    assert h["UL5_1"] == d.depth
    assert single.read_bytes() != raw_bytes
    assert np.array_equal(fits.getdata(single), img)  # pixels untouched
    cat = Table.read(d.catalogue_path, format="ascii")
    assert f"MAG_APER_1_{FILT}" in cat.colnames and len(cat) > 50
    assert cat.meta["provenance"]["PIPESTG"] == "phot"
    assert (dirs.phot / f"{single.name[:-5]}.zp.png").stat().st_size > 10000
    assert "circle(" in (dirs.phot / f"{single.name[:-5]}.phot.reg").read_text()
    assert not list(dirs.base.glob(".*.part"))

    s = by_path[(str(stack), "stack")]
    assert s.ok and "ZP_AUTO" in fits.getheader(stack)

    f = by_path[(str(dirs.base / "calib_failed.fits"), "single")]
    assert not f.ok and "SCAMP" in f.reason
    n = by_path[(str(stack), "difference")]
    assert not n.ok and "no reference" in n.reason
    lone = by_path[(str(lonely), "single")]
    assert not lone.ok and "reference catalogue" in lone.reason
    assert any(x.item_path == str(lonely) and x.stage == "phot" for x in failed)
    b = by_path[(str(broken), "single")]
    assert not b.ok and "sextractor" in b.reason.lower()
    assert any(x.item_path == str(broken) for x in failed)
    assert "ZP_AUTO" not in fits.getheader(broken)
    # the ledger can see the outcome of each: every event answered exactly once
    assert len({(x.image_path, x.image_kind) for x in done}) == len(done)
    json.dumps([x.model_dump() for x in done])
