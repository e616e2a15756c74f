"""The watcher's operations API over HTTP, with a real nats-server and the real watcher.

Nights are driven by publishing the stages' events (tests/conftest_watcher.py); the truth is
what the test published and wrote (frame states, QA header values, candidates).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from conftest_ops import CUTOUT_PX, QaNight, running_service  # noqa: E402
from conftest_watcher import (  # noqa: E402
    UNIT,
    Publisher,
    SimNight,
    night_dir,
    readies,
    running_watcher,
    wait_for,
    watcher_settings,
    write_raw,
)

from gppy.local import free_port  # noqa: E402
from gppy.messages import Event  # noqa: E402
from gppy.runtime import StageService, services_bucket  # noqa: E402
from gppy_watcher.service import adhoc_night_ready  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAIL = "SCAMP: 3 matched stars < 15"


def api_settings(settings, **over):
    return watcher_settings(settings, http_port=free_port(), http_host="127.0.0.1", api_token=TOKEN, **over)


def client(s) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=10)


async def _state(svc, nid: str, state: str):
    rec = svc.ledger.cached(nid)
    return rec if rec is not None and rec.state == state else None


async def test_mutations_need_the_token_and_reads_do_not(settings):
    s = api_settings(settings)
    async with running_watcher(s), client(s) as c:
        assert (await c.get("/nights")).status_code == 200
        for method, url, body in (("POST", "/nights/X_1/requeue", None), ("POST", "/nights/X_1/frames/requeue",
                                                                            {"frame": "/x"}),
                                  ("POST", "/nights", {"unit": UNIT, "night_dir": "/x"})):
            r = await c.request(method, url, json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (url, r.text)
            r = await c.request(method, url, json=body, headers={"Authorization": "Basic " + TOKEN})
            assert r.status_code == 401, url
            r = await c.request(method, url, json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 403, url
        # the right token passes authorisation (and the unknown night is then a 404)
        r = await c.post("/nights/X_1/requeue", headers=AUTH)
        assert r.status_code == 404 and "unknown night" in r.json()["detail"]
        # OpenAPI documents the routes and the bearer scheme
        spec = (await c.get("/openapi.json")).json()
        assert {"/nights", "/nights/{night_id}", "/nights/{night_id}/requeue", "/nights/{night_id}/frames/requeue",
                "/queues", "/failures", "/nights/{night_id}/qa", "/nights/{night_id}/candidates"} <= set(spec["paths"])
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert spec["paths"]["/nights/{night_id}/requeue"]["post"]["security"] == [{"HTTPBearer": []}]
        assert (await c.get("/docs")).status_code == 200


async def test_night_detail_follows_frames_and_products_then_a_frame_is_requeued(settings):
    s = api_settings(settings)
    ready = adhoc_night_ready(s, UNIT, night_dir(s, "2025-01-02_gain2750"))
    nid = ready.night_id
    night = QaNight(SimNight.make(s, ready, {"A": [0, 1], "B": [2, 3]}, obj="T00007", filt="m650"))
    sim = night.sim
    f0, f1, f2, f3 = sim.frames
    async with running_watcher(s) as svc, Publisher(s) as pub, client(s) as c:
        await pub(ready)
        await wait_for(lambda: svc.ledger.cached(nid), 30, "the night to be adopted")
        ev1 = night.frame_events(1, fail=FAIL)
        await pub(sim.plan(), *night.frame_events(0), *ev1[:2], sim.calibrated(f2))
        await wait_for(lambda: (svc.ledger.cached(nid).progress.get("calib", {}).get("done") == 3), 30,
                       "three frames calibrated")
        d = (await c.get(f"/nights/{nid}")).json()
        assert d["state"] == "processing" and d["night_id"] == nid and d["unit"] == UNIT
        frames = {f["path"]: f for f in d["frames"]}
        assert {p: f["state"] for p, f in frames.items()} == {
            str(f0.calib): "done", str(f1.calib): "failed", str(f2.calib): "astrometry", str(f3.calib): "calibration"}
        assert frames[str(f1.calib)]["reason"] == FAIL and frames[str(f0.calib)]["visit"] == "A"
        assert all(f["object"] == "T00007" and f["filter"] == "m650" for f in d["frames"])
        bars = {b["stage"]: b for b in d["stages"]}
        assert (bars["calib"]["done"], bars["calib"]["total"]) == (3, 4)
        assert (bars["astrometry"]["done"], bars["astrometry"]["failed"]) == (1, 1)
        assert (bars["stack"]["done"], bars["stack"]["total"]) == (0, 2)
        prods = {(p["path"], p["kind"]) for p in d["products"] if p["exists"]}
        for f in (f0, f1, f2):
            assert (str(f.calib), "single") in prods and (str(f.calib).replace(".fits", ".weight.fits"), "weight") in prods
        assert [x["stage"] for x in d["failures"]] == ["astrometry"] and d["failures"][0]["reason"] == FAIL
        # the failure is listed with its reason
        fl = (await c.get("/failures")).json()
        assert [(x["night_id"], x["stage"], x["reason"]) for x in fl] == [(nid, "astrometry", FAIL)]
        # a frame cannot be re-run while its night is being processed
        r = await c.post(f"/nights/{nid}/frames/requeue", json={"frame": str(f1.calib)}, headers=AUTH)
        assert r.status_code == 409

        # the rest of the night
        await pub(ev1[2], *night.frame_events(2)[1:], *night.frame_events(3), *night.visit_events("A"),
                  *night.visit_events("B", n_candidates=2))
        await wait_for(lambda: _state(svc, nid, "done"), 30, "the night to end")
        d = (await c.get(f"/nights/{nid}")).json()
        frames = {f["path"]: f for f in d["frames"]}
        assert {p: f["state"] for p, f in frames.items()} == {
            str(f0.calib): "done", str(f1.calib): "failed", str(f2.calib): "done", str(f3.calib): "done"}
        assert frames[str(f1.calib)]["reason"] == FAIL
        kinds = {}
        for p in d["products"]:
            kinds.setdefault(p["kind"], set()).add(p["path"])
            # the stand-in stages wrote every image and the transient catalogues, no .phot.cat
            assert p["exists"] == (not p["path"].endswith(".phot.cat")), p
        assert kinds["stack"] == {str(sim.stack_path(v)) for v in "AB"}
        assert kinds["difference"] == {str(sim.diff_path(v)) for v in "AB"}
        assert d["report_url"] == f"/nights/{nid}/report"
        r = await c.get(d["report_url"], follow_redirects=True)
        assert r.status_code == 200 and str(r.url).endswith(f"/files/nights/{nid}.html")

        # QA of every photometered frame and stack, at the values written in their headers
        qa = (await c.get(f"/nights/{nid}/qa")).json()
        got = {i["path"]: (i["seeing"], i["zp"], i["depth"], i["kind"]) for i in qa["images"]}
        want = {p: (*night.truth(p), "stack" if ".com." in p else "single")
                for p in [str(f0.calib), str(f2.calib), str(f3.calib)] + [str(sim.stack_path(v)) for v in "AB"]}
        assert got == want
        assert [(g["kind"], g["filter"], g["n"]) for g in qa["by_filter"]] == [("single", "m650", 3), ("stack", "m650", 2)]
        # candidates: newest difference first, rejected rows left out, cutouts served
        cand = (await c.get(f"/nights/{nid}/candidates", params={"limit": 3})).json()
        assert cand["total"] == 5
        assert [x["id"] for x in cand["candidates"]] == [c_.id for c_ in night.candidates["B"]] + [night.candidates["A"][0].id]
        for x in cand["candidates"]:
            assert (x["object"], x["filter"], x["label"]) == ("T00007", "m650", "new")
            for tag, url in x["cutout_urls"].items():
                r = await c.get(url)
                assert r.status_code == 200 and r.headers["content-type"] == "image/png"
                assert int.from_bytes(r.content[16:20], "big") == CUTOUT_PX[tag]  # PNG IHDR width

        # re-run the failed frame: a new run restricted to its object and filter
        r = await c.post(f"/nights/{nid}/frames/requeue", json={"frame": "/elsewhere/x.fits"}, headers=AUTH)
        assert r.status_code == 404
        r = await c.post(f"/nights/{nid}/frames/requeue", json={"frame": str(f1.calib)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert (r.json()["state"], r.json()["run"], r.json()["targets"], r.json()["filters"]) == \
            ("queued", 2, ["T00007"], ["m650"])
        evs = await wait_for(lambda: _n(readies(s, nid), 2), 30, "the new night-ready event")
        assert (evs[-1].targets, evs[-1].filters) == (["T00007"], ["m650"])
        # metrics of the watcher: nights by state
        m = (await c.get("/metrics")).text
        assert 'gppy_nights{state="queued"} 1.0' in m and 'gppy_nights{state="done"} 0.0' in m


async def _n(coro, n):
    evs = await coro
    return evs if len(evs) >= n else None


async def test_a_rejected_raw_frame_is_requeued_by_its_header(settings):
    s = api_settings(settings)
    d = night_dir(s, "2025-01-03_gain2750")
    raw = write_raw(d, 7, obj="T00009", filt="m700")
    ready = adhoc_night_ready(s, UNIT, d)
    nid = ready.night_id
    sim = SimNight.make(s, ready, {})
    async with running_watcher(s) as svc, Publisher(s) as pub, client(s) as c:
        await pub(ready)
        await wait_for(lambda: svc.ledger.cached(nid), 30, "the night to be adopted")
        await pub(sim.plan(rejected={str(raw): "bad header"}))
        await wait_for(lambda: _state(svc, nid, "done"), 30, "the night without a good frame to end")
        r = await c.post(f"/nights/{nid}/frames/requeue", json={"frame": str(raw)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert (r.json()["targets"], r.json()["filters"]) == (["T00009"], ["m700"])
        await wait_for(lambda: _n(readies(s, nid), 2), 30, "the new night-ready event")


async def test_an_adhoc_night_is_submitted_with_its_restriction(settings, tmp_path):
    s = api_settings(settings)
    d = Path(s.paths().path_obsdata) / "7DT02" / "2025-02-03_gain2750"
    d.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with running_watcher(s) as svc, client(s) as c:
        body = {"unit": "7DT02", "night_dir": str(d), "targets": ["T00001"], "filters": ["m425", "m450"]}
        r = await c.post("/nights", json=body, headers=AUTH)
        assert r.status_code == 202, r.text
        nid = r.json()["night_id"]
        assert nid == "7DT02_2025-02-03_gain2750" and r.json()["lane"] == "survey"
        evs = await wait_for(lambda: readies(s, nid), 30, "the night-ready event")
        assert [(e.unit, e.night_dir, e.targets, e.filters) for e in evs] == [("7DT02", str(d), ["T00001"],
                                                                               ["m425", "m450"])]
        await wait_for(lambda: svc.ledger.cached(nid), 30, "the watcher to adopt it")
        rows = (await c.get("/nights", params={"unit": "7DT02"})).json()
        assert [(x["night_id"], x["source"], x["state"], x["targets"], x["filters"]) for x in rows] == \
            [(nid, "adhoc", "queued", ["T00001"], ["m425", "m450"])]
        for bad, code in (({"night_dir": "relative/night"}, 400), ({"night_dir": str(elsewhere)}, 400),
                          ({"night_dir": str(d.parent / "2025-02-04_gain2750")}, 400),
                          ({"night_dir": str(d.parent.parent / ".." / "elsewhere")}, 400),
                          ({"unit": "7DT/../x"}, 400), ({"targets": ["T" * 65]}, 422)):
            r = await c.post("/nights", json=dict(body, **bad), headers=AUTH)
            assert r.status_code == code, (bad, r.text)
        assert len(await readies(s)) == 1


class BlockingAstrometry(StageService):
    """Stands in for the astrometry stage: takes frames and holds them until released."""

    name = "astrometry"
    consumes = ["frame.calibrated"]

    def __init__(self, settings, gate: asyncio.Event):
        super().__init__(settings)
        self.gate = gate
        self.presence_every_s = 0.2
        self.taken = 0

    async def handle(self, event: Event) -> list[Event]:
        self.taken += 1
        await self.gate.wait()
        return []


async def test_queue_depth_and_workers_per_stage(settings):
    s = api_settings(settings)
    ready = adhoc_night_ready(s, UNIT, night_dir(s, "2025-01-04_gain2750"))
    sim = SimNight.make(s, ready, {"A": list(range(5))})
    gate = asyncio.Event()
    w = settings.model_copy(update={"concurrency": 1})
    r1, r2 = BlockingAstrometry(w, gate), BlockingAstrometry(w, gate)
    r2.replica = r1.replica + "-b"  # two replicas in one process
    async with running_watcher(s), Publisher(s) as pub, client(s) as c:
        async with running_service(r1), running_service(r2):
            await pub(*[sim.calibrated(f, write=False) for f in sim.frames])
            await wait_for(lambda: r1.taken == 1 and r2.taken == 1, 30, "each replica to take one frame")

            async def astrometry(pending, ack, workers):
                q = (await c.get("/queues")).json()
                row = {x["stage"]: x for x in q["stages"]}["astrometry"]
                ok = (row["pending"], row["ack_pending"], row["workers"]) == (pending, ack, workers)
                return row if ok else None

            row = await wait_for(lambda: astrometry(3, 2, 2), 30, "3 waiting, 2 in progress, 2 workers")
            assert row["lanes"]["survey"]["pending"] == 3 and row["lanes"]["too"]["pending"] == 0
            assert sorted(x["replica"] for x in row["replicas"]) == sorted([r1.replica, r2.replica])
            # each replica exports its stage's backlog too
            await wait_for(lambda: r1.registry.get_sample_value(
                "gppy_queue_pending", {"stage": "astrometry", "lane": "survey"}) == 3, 30, "the backlog metric")
            gate.set()
            await wait_for(lambda: astrometry(0, 0, 2), 30, "the backlog to drain")
            assert r1.taken + r2.taken == 5
            r3 = BlockingAstrometry(w, gate)
            r3.replica += "-c"
            async with running_service(r3):  # a third replica, then it stops
                await wait_for(lambda: astrometry(0, 0, 3), 30, "three workers")
            await wait_for(lambda: astrometry(0, 0, 2), 30, "a stopped replica to leave")
        await wait_for(lambda: astrometry(0, 0, 0), 30, "every replica to leave")
        q = (await c.get("/queues")).json()
        assert {x["stage"]: x["workers"] for x in q["stages"]}["watcher"] == 1
    assert services_bucket(s) == "gppy-services"


async def test_files_are_served_only_from_the_processed_tree(settings, tmp_path):
    s = api_settings(settings)
    processed = Path(s.paths().path_processed)
    png = processed / "T1" / UNIT / "m425" / "transient" / "png_image" / "x.1.sci.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)
    (processed / "T1" / UNIT / "m425" / "calib_x.fits").write_bytes(b"SIMPLE")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    os.symlink(secret, processed / "link.json")
    async with running_watcher(s), client(s) as c:
        r = await c.get(f"/files/T1/{UNIT}/m425/transient/png_image/x.1.sci.png")
        assert r.status_code == 200 and r.content == png.read_bytes() and r.headers["content-type"] == "image/png"
        assert (await c.get("/files/..%2F..%2Fpath.json")).status_code == 403
        assert (await c.get("/files/%2e%2e/%2e%2e/path.json")).status_code == 403
        assert (await c.get("/files/link.json")).status_code == 403  # a symlink out of the tree
        assert (await c.get(f"/files/T1/{UNIT}/m425/calib_x.fits")).status_code == 403  # no FITS
        assert (await c.get("/files/T1/missing.png")).status_code == 404
