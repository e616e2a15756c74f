"""The dashboard in a real headless browser (Debian's chromium driven by Playwright).

A night is driven through the real watcher (in-process, real nats-server) by publishing the
stages' events; its images carry known seeing / zero point / depth and its differences known
candidates with cutouts. The page, loaded once, must follow the night as it advances (per
stage progress bars, a failure with its reason, the QA plots, the candidates' thumbnails)
without being reloaded, and end with the night in the recent list with its report.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from conftest_ops import CUTOUT_PX, QaNight, chromium_page  # noqa: E402
from conftest_watcher import (  # noqa: E402
    UNIT,
    Publisher,
    SimNight,
    night_dir,
    running_watcher,
    wait_for,
    watcher_settings,
)

from gppy.local import free_port  # noqa: E402
from gppy_watcher.service import adhoc_night_ready  # noqa: E402

TIMEOUT_MS = 30000
FAIL = "SCAMP: 3 matched stars < 15"


async def bar(page, nid: str, stage: str) -> dict | None:
    return await page.evaluate(
        """([nid, stage]) => {
             const b = document.querySelector(`.night[data-night="${nid}"] .bar[data-stage="${stage}"]`);
             return b ? {done: +b.dataset.done, failed: +b.dataset.failed, total: b.dataset.total} : null; }""",
        [nid, stage])


async def wait_bar(page, nid: str, stage: str, done: int, failed: int, total: int) -> None:
    await page.wait_for_function(
        """([nid, stage, done, failed, total]) => {
             const b = document.querySelector(`.night[data-night="${nid}"] .bar[data-stage="${stage}"]`);
             return b && +b.dataset.done === done && +b.dataset.failed === failed && b.dataset.total === String(total); }""",
        arg=[nid, stage, done, failed, total], timeout=TIMEOUT_MS)


async def points(page, plot: str) -> dict[str, float]:
    return dict(await page.eval_on_selector_all(
        f"#plot-{plot} .pt", "els => els.map(e => [e.dataset.name, Number(e.dataset.value)])"))


async def test_dashboard_follows_a_night_and_shows_its_candidates(settings):
    port = free_port()
    s = watcher_settings(settings, http_port=port, http_host="127.0.0.1")
    ready = adhoc_night_ready(s, UNIT, night_dir(s, "2025-01-02_gain2750"))
    nid = ready.night_id
    night = QaNight(SimNight.make(s, ready, {"A": [0, 1], "B": [2, 3]}))
    sim = night.sim
    base = f"http://127.0.0.1:{port}"
    async with running_watcher(s) as svc, Publisher(s) as pub, chromium_page() as page:
        await pub(ready)
        await wait_for(lambda: svc.ledger.cached(nid), 30, "the watcher to adopt the night")
        await page.goto(f"{base}/")  # redirected to /dashboard/
        assert page.url == f"{base}/dashboard/"
        await page.evaluate("window.__samePage = 'loaded once'")
        await page.wait_for_selector(f'.night[data-night="{nid}"]', timeout=TIMEOUT_MS)

        # the plan and two frames: a third of the way
        await pub(sim.plan(), *night.frame_events(0), *night.frame_events(1))
        await wait_bar(page, nid, "phot_single", 2, 0, 4)
        assert await bar(page, nid, "calib") == {"done": 2, "failed": 0, "total": "4"}
        assert await bar(page, nid, "stack") == {"done": 0, "failed": 0, "total": "2"}
        # the watcher itself is a worker with a heartbeat
        await page.wait_for_function(
            "() => { const c = document.querySelector('#queues tr[data-stage=\"watcher\"] .workers');"
            " return c && c.textContent === '1'; }", timeout=TIMEOUT_MS)
        await page.wait_for_function("() => document.querySelectorAll('#plot-seeing .pt').length === 2",
                                     timeout=TIMEOUT_MS)

        # frame 2 comes through, frame 3 fails in astrometry; the first visit is stacked and subtracted
        await pub(*night.frame_events(2), *night.frame_events(3, fail=FAIL), *night.visit_events("A"))
        await wait_bar(page, nid, "astrometry", 3, 1, 4)
        await wait_bar(page, nid, "phot_difference", 1, 0, 1)
        await page.wait_for_selector(f'#failures li[data-night="{nid}"][data-stage="astrometry"]', timeout=TIMEOUT_MS)
        reason = await page.text_content(f'#failures li[data-night="{nid}"][data-stage="astrometry"] .reason')
        assert reason == FAIL
        await page.wait_for_function("() => document.querySelectorAll('#candidates .cand').length === 3",
                                     timeout=TIMEOUT_MS)

        # the second visit: the night ends
        await pub(*night.visit_events("B"))
        await page.wait_for_selector(f'#recent tr[data-night="{nid}"] a.report', timeout=TIMEOUT_MS)
        await page.wait_for_selector(f'.night[data-night="{nid}"]', state="detached", timeout=TIMEOUT_MS)
        assert await page.text_content(f'#recent tr[data-night="{nid}"] .state') == "done"
        await page.wait_for_function("() => document.querySelectorAll('#candidates .cand').length === 6",
                                     timeout=TIMEOUT_MS)

        # QA: one point per photometered frame and stack, at the values their headers hold
        qa_images = [str(f.calib) for f in sim.frames[:3]] + [str(sim.stack_path(v)) for v in ("A", "B")]
        for plot, truth in (("seeing", night.seeing), ("zp", night.zp), ("depth", night.depth)):
            shown = await points(page, plot)
            assert shown == {Path(p).name: truth[p] for p in qa_images}, plot
        kinds = await page.eval_on_selector_all("#plot-seeing .pt", "els => els.map(e => e.tagName + ':' + e.dataset.kind)")
        assert sorted(kinds) == ["circle:single"] * 3 + ["rect:stack"] * 2

        # candidates: every true candidate (not the rejected row), newest difference first, with
        # its three cutouts loaded from the watcher's /files route
        ids = await page.eval_on_selector_all("#candidates .cand", "els => els.map(e => +e.dataset.id)")
        assert ids == [c.id for c in night.candidates["B"]] + [c.id for c in night.candidates["A"]]
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#candidates img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=TIMEOUT_MS)
        imgs = await page.eval_on_selector_all(
            "#candidates img", "els => els.map(i => [i.dataset.tag, i.naturalWidth, i.naturalHeight, i.src])")
        assert len(imgs) == 18
        for tag, w, h, src in imgs:
            assert (w, h) == (CUTOUT_PX[tag], CUTOUT_PX[tag]) and src.startswith(f"{base}/files/") and \
                src.endswith(f".{tag}.png")

        # one page load all along, refreshed by polling
        assert await page.evaluate("window.__samePage") == "loaded once"
        assert int(await page.get_attribute("body", "data-polls")) >= 3

        # the report link of the finished night
        href = await page.get_attribute(f'#recent tr[data-night="{nid}"] a.report', "href")
        async with httpx.AsyncClient(base_url=base, follow_redirects=True) as client:
            r = await client.get(href)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert nid in r.text and "Transient candidates (6)" in r.text and html.escape(FAIL) in r.text
