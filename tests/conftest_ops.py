"""Helpers for the operations tests (API, dashboard, report, logs).

A night is driven through the real watcher (in-process, real nats-server) by publishing the
stages' events, as tests/conftest_watcher.py does; on top of that the images carry known QA
header values (seeing, zero point, depth) and the differences known transient candidates
with cutout PNGs of known sizes: the truth the API, the dashboard and the report must show.

Import from a test file after putting this folder on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from conftest_watcher import SimNight, wait_for

from gppy import naming
from gppy.fitsio import write_fits, write_text
from gppy.messages import PhotometryDone

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage"]
#: Cutout widths per tag (px): distinct, so a browser test can tell the three images apart.
CUTOUT_PX = {"sci": 30, "ref": 31, "sub": 32}


def write_qa_image(path: Path, obj: str, filt: str, seeing: float, zp: float, depth: float, mjd: float,
                   kind: str = "single") -> None:
    """A small image whose header holds the photometry stage's QA keys (the truth)."""
    h = fits.Header()
    h["OBJECT"] = obj
    h["FILTER"] = filt
    h["PRODKIND"] = kind
    h["MJD"] = mjd
    h["DATE-OBS"] = "2025-01-02T03:00:00.000"
    h["SEEING"] = seeing
    h["ZP_AUTO"] = zp - 0.3  # ZP_TOT, when present, is the zero point shown
    h["ZP_TOT"] = zp
    h["EZP_TOT"] = 0.01
    h["UL5_1"] = depth
    write_fits(path, np.zeros((8, 8), np.float32), h)


def png_bytes(width: int, height: int, level: float) -> bytes:
    """A grey PNG of ``width`` x ``height`` pixels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, np.full((height, width), level, np.float32), vmin=0.0, vmax=1.0, cmap="gray", format="png")
    return buf.getvalue()


@dataclass
class Candidate:
    id: int
    ra: float
    dec: float
    label: str
    mag: float
    candidate: bool = True


def write_candidates(diff_path: Path, science_path: Path, rows: list[Candidate]) -> Path:
    """``<stem>.subt.transient.cat`` (ECSV) beside the difference, and cutouts of the candidates."""
    t = Table()
    t["ID"] = np.array([r.id for r in rows], np.int32)
    t["ALPHA_J2000"] = [r.ra for r in rows]
    t["DELTA_J2000"] = [r.dec for r in rows]
    t["label"] = [r.label for r in rows]
    t["candidate"] = [r.candidate for r in rows]
    t["rb"] = [0.9 for _ in rows]
    t["snr_psf"] = [12.0 for _ in rows]
    t["MAG_DIFF"] = [r.mag for r in rows]
    t["MAGERR_DIFF"] = [0.05 for _ in rows]
    buf = io.StringIO()
    t.write(buf, format="ascii.ecsv")
    cat = diff_path.parent / f"{naming.stem(diff_path)}.transient.cat"
    write_text(cat, buf.getvalue())
    png_dir = diff_path.parent / "png_image"
    png_dir.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if not r.candidate:
            continue
        for i, (tag, px) in enumerate(CUTOUT_PX.items()):
            (png_dir / f"{naming.stem(science_path)}.{r.id}.{tag}.png").write_bytes(png_bytes(px, px, 0.2 + 0.3 * i))
    return cat


@dataclass
class QaNight:
    """A :class:`SimNight` whose images carry known QA values and whose differences carry
    known candidates."""

    sim: SimNight
    seeing: dict[str, float] = field(default_factory=dict)   # calib path -> arcsec
    zp: dict[str, float] = field(default_factory=dict)
    depth: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)  # visit -> rows

    def truth(self, path) -> tuple[float, float, float]:
        p = str(path)
        return self.seeing[p], self.zp[p], self.depth[p]

    def frame_events(self, i: int, fail: str = "") -> list:
        """calibrated, solved, then (with the QA header written) the photometry of frame ``i``;
        with ``fail`` its astrometry fails for that reason (no photometry, no QA)."""
        sim, f = self.sim, self.sim.frames[i]
        cal = sim.calibrated(f)
        if fail:
            return [cal, sim.solved(f, ok=False, reason=fail),
                    sim.phot(f.calib, "single", ok=False, reason=f"frame not solved: {fail}")]
        see, zp, depth = 1.6 + 0.35 * i, 25.2 - 0.07 * i, 19.9 - 0.15 * i
        write_qa_image(f.calib, f.obj, f.filt, see, zp, depth, 60677.12 + i * 0.004)
        self.seeing[str(f.calib)], self.zp[str(f.calib)], self.depth[str(f.calib)] = see, zp, depth
        return [cal, sim.solved(f), sim.phot(f.calib, "single")]

    def visit_events(self, visit: str, n_candidates: int = 3) -> list:
        """stack (QA header), its photometry, the difference with candidates and its search."""
        sim = self.sim
        stacked = sim.stacked(visit)
        p = sim.stack_path(visit)
        fs = [f for f in sim.frames if f.visit == visit]
        k = len(self.candidates)
        see, zp, depth = 1.9 + 0.1 * k, 25.6 + 0.05 * k, 20.8 - 0.1 * k
        write_qa_image(p, fs[0].obj, fs[0].filt, see, zp, depth, 60677.12 + 0.01 * (k + 1), "stack")
        self.seeing[str(p)], self.zp[str(p)], self.depth[str(p)] = see, zp, depth
        diff = sim.differenced(visit)
        dpath = sim.diff_path(visit)
        rows = [Candidate(10 * (k + 1) + j, 150.0 + 0.01 * j, 2.0 + 0.01 * j, "new", 18.0 + 0.1 * j)
                for j in range(n_candidates)] + [Candidate(99, 150.5, 2.5, "bogus", 21.0, candidate=False)]
        cat = write_candidates(dpath, p, rows)
        self.candidates[visit] = [r for r in rows if r.candidate]
        r = sim.ready
        done = PhotometryDone(night_id=r.night_id, unit=r.unit, lane=r.lane, image_path=str(dpath),
                              image_kind="difference", catalogue_path=str(cat).replace(".transient.cat", ".phot.cat"),
                              candidates_path=str(cat), ncandidates=n_candidates)
        return [stacked, sim.phot(p, "stack"), diff, done]


@contextlib.asynccontextmanager
async def running_service(svc):
    """Any StageService serving in this event loop until the block ends."""
    task = asyncio.create_task(svc.serve())
    try:
        await wait_for(lambda: svc._ready or task.done(), 30, f"{svc.name} to connect")
        if task.done():
            task.result()
        yield svc
    finally:
        svc._stopping.set()
        await asyncio.wait_for(task, 60)


@contextlib.asynccontextmanager
async def chromium_page():
    """A page of Debian's chromium driven by Playwright (never a downloaded browser)."""
    from playwright.async_api import async_playwright

    if not os.path.exists(CHROMIUM):
        raise AssertionError(f"{CHROMIUM} is missing: apt-get install -y chromium")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        try:
            page = await browser.new_page()
            yield page
        finally:
            await browser.close()
