"""The end-of-night HTML report: its figures against the truth written into the products, its
links, and its place in the watcher's end of night and Slack finish message."""

from __future__ import annotations

import base64
import html
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from conftest_ops import CUTOUT_PX, Candidate, QaNight, write_candidates, write_qa_image  # noqa: E402
from conftest_watcher import (  # noqa: E402
    UNIT,
    Publisher,
    SimNight,
    SlackStandIn,
    night_dir,
    running_watcher,
    wait_for,
    watcher_settings,
)

from gppy import naming  # noqa: E402
from gppy.notify import SlackNotifier  # noqa: E402
from gppy_watcher import report  # noqa: E402
from gppy_watcher.service import adhoc_night_ready  # noqa: E402


class Page(HTMLParser):
    """Tables (by class) as lists of cell texts, images, and candidate ids of a report."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.imgs: list[dict] = []
        self.cands: list[str] = []
        self._table = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.tables = {k: [r for r in v if r] for k, v in self.tables.items()}  # without the header rows

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("class") or f"t{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag == "td" and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "div" and a.get("class") == "cand":
            self.cands.append(a["data-id"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_figures_links_and_failures(tmp_path):
    rng = np.random.default_rng(7)
    processed = tmp_path / "processed"
    truth: dict[str, list[tuple[float, float, float]]] = {}
    singles, stacks = [], []
    for filt, n in (("m425", 5), ("m650", 4)):
        dirs = naming.ProductDirs.of(processed, "T00003", UNIT, filt)
        for i in range(n):
            p = dirs.base / f"calib_{UNIT}_T00003_20250102_03{i:02d}00_{filt}_60.fits"
            vals = (rng.uniform(1.4, 3.5), rng.uniform(24.5, 25.5), rng.uniform(18.5, 20.5))
            write_qa_image(p, "T00003", filt, *vals, 60677.1 + 0.003 * i)
            truth.setdefault(filt, []).append(vals)
            singles.append(str(p))
        st = dirs.base / f"calib_{UNIT}_T00003_20250102_030000_{filt}_{60 * n}.com.fits"
        write_qa_image(st, "T00003", filt, 2.0, 25.8, 21.0, 60677.1, "stack")
        stacks.append(str(st))
    diff = naming.difference_name(Path(stacks[0]), naming.ProductDirs(Path(stacks[0]).parent))
    cands = [Candidate(1, 150.1, 2.2, "new", 18.5), Candidate(2, 150.2, 2.3, "brightening", 19.5),
             Candidate(3, 150.3, 2.4, "bogus", 21.0, candidate=False)]
    cat = write_candidates(diff, Path(stacks[0]), cands)
    summary = {
        "night_id": f"{UNIT}_2025-01-02_gain2750", "unit": UNIT, "status": "done", "note": "-",
        "night_dir": "/obs/7DT01/2025-01-02_gain2750", "duration_s": 600.0,
        "frames": {"planned": 10, "failed": [{"path": "/p/calib_bad.fits", "reason": "SCAMP: 3 matched stars < 15"}]},
        "stages": {"calib": {"done": 10, "failed": 0}, "astrometry": {"done": 9, "failed": 1},
                   "subtract": {"done": 1, "no_reference": 1, "failed": 0}},
        "timings": {"calib": {"outputs": 11, "first_output": "a", "last_output": "b", "span_s": 123.4}},
        "products": {"singles": singles, "stacks": stacks, "differences": [str(diff)],
                     "catalogues": [str(cat), str(cat).replace(".transient.cat", ".phot.cat")]},
        "no_reference": {stacks[1]: "no reference image for this field"},
        "failures": [{"stage": "astrometry", "reason": "SCAMP: 3 matched stars < 15", "count": 1,
                      "items": ["/p/calib_bad.fits"]}],
        "outstanding_at_end": [],
    }
    dest = report.write_report(summary, processed / "nights" / f"{summary['night_id']}.json")
    assert dest == processed / "nights" / f"{UNIT}_2025-01-02_gain2750.html"
    page = Page(dest.read_text())

    # per filter: the medians of the values in the headers
    rows = {(r[0], r[1]): r[2:] for r in page.tables["qa-by-filter"]}
    for filt, vals in truth.items():
        see, zp, depth = np.median(np.array(vals), axis=0)
        assert rows[("singles", filt)] == [str(len(vals)), f"{see:.2f}", f"{zp:.3f}", f"{depth:.2f}"]
        assert rows[("stacks", filt)] == ["1", "2.00", "25.800", "21.00"]
    frames = page.tables["qa-frames"]
    assert len(frames) == 9 and {r[0] for r in frames} == {Path(p).name for p in singles}
    # the QA plot is an inline PNG
    qa_img = [i for i in page.imgs if i.get("class") == "qa"]
    assert len(qa_img) == 1 and qa_img[0]["src"].startswith("data:image/png;base64,")
    w, h = png_size(base64.b64decode(qa_img[0]["src"].split(",", 1)[1]))
    assert (w, h) == (640, 600)  # 8 x 7.5 inches at 80 dpi
    # the candidates, not the rejected row, each with its three cutouts linked relative to the report
    assert page.cands == ["1", "2"]
    cut = [i for i in page.imgs if i.get("alt") in CUTOUT_PX]
    assert len(cut) == 6
    for img in cut:
        target = (dest.parent / img["src"]).resolve()
        assert target.is_file() and target.name.endswith(f".{img['alt']}.png")
        assert png_size(target.read_bytes()) == (CUTOUT_PX[img["alt"]],) * 2
    # stages, stacks, subtractions and failures
    stages = {r[0]: r[1:] for r in page.tables["t1"]}
    assert stages["astrometry"][:2] == ["9", "1"] and stages["calibration"][-1] == "123.4"
    assert stages["subtraction"][:3] == ["1", "0", "1"]
    assert [r[0] for r in page.tables["stacks"]] == [Path(p).name for p in stacks]
    assert page.tables["noref"] == [[Path(stacks[1]).name, "no reference image for this field"]]
    assert page.tables["failures"][0][:3] == ["astrometry", "SCAMP: 3 matched stars < 15", "1"]
    assert page.tables["failed-frames"] == [["calib_bad.fits", "SCAMP: 3 matched stars < 15"]]


def test_report_link_is_a_url_with_a_public_address():
    assert report.report_link("7DT01_n", "/p/nights/7DT01_n.html") == "/p/nights/7DT01_n.html"
    assert report.report_link("7DT01_n", "/p/x.html", "https://ops.example/") == \
        "https://ops.example/nights/7DT01_n/report"


async def test_the_watcher_writes_the_report_and_links_it_from_slack(settings, monkeypatch):
    slack = SlackStandIn().up()
    s = watcher_settings(settings)
    runs = []
    try:
        for i, public in enumerate((None, "http://ops.example:8700")):
            if public:
                monkeypatch.setenv("GPPY_PUBLIC_URL", public)
            ready = adhoc_night_ready(s, UNIT, night_dir(s, f"2025-01-0{i + 2}_gain2750"))
            night = QaNight(SimNight.make(s, ready, {"A": [0, 1]}))
            notifier = SlackNotifier(slack.token, "#pipeline", slack.base_url, max_tries=3, backoff_s=0.1)
            async with running_watcher(s, notifier=notifier) as svc, Publisher(s) as pub:
                await pub(ready)
                await wait_for(lambda r=ready: svc.ledger.cached(r.night_id), 30, "the night to be adopted")
                await pub(night.sim.plan(), *night.frame_events(0), *night.frame_events(1), *night.visit_events("A"))
                msg = await wait_for(lambda r=ready: [t for t in slack.texts() if "Processing complete" in t
                                                      and Path(r.night_dir).name in t], 60, "the finish message")
            runs.append((ready.night_id, msg[0]))
    finally:
        slack.down()
    processed = Path(s.paths().path_processed)
    for (nid, msg), public in zip(runs, (None, "http://ops.example:8700"), strict=True):
        dest = processed / "nights" / f"{nid}.html"
        assert dest.is_file()
        text = dest.read_text()
        assert "Transient candidates (3)" in text and html.escape(nid) in text
        link = re.search(r"Report: (\S+)$", msg).group(1)
        assert link == (f"{public}/nights/{nid}/report" if public else str(dest))
