"""The end-of-night HTML report, and the per-image QA figures it shares with the dashboard.

At the end of a night the watcher writes ``<path_processed>/nights/<night_id>.html`` next to
the night summary (:func:`gppy_watcher.endofnight.summary_path`): per-stage counts and
timings, QA plots (seeing, zero point and 5-sigma depth of every photometered frame and
stack, per filter), the stacks made, the subtractions (and the stacks left without a
reference), the transient candidates with their science/reference/difference cutouts, and
every failure. The page is one file (plots as inline PNG); the cutouts are linked by paths
relative to the report, so it reads the same opened from disk or served by the watcher's
``/files`` route.

The QA figures come from the image headers the photometry stage wrote (v1-behaviour.md §7.2
item 11): ``SEEING`` [arcsec], the zero point ``ZP_TOT`` (curve-of-growth total flux; else
``ZP_AUTO``) [AB mag] and ``UL5_1`` (5-sigma limit in the 2xseeing aperture) [AB mag].
Candidates come from the ``<stem>.subt.transient.cat`` catalogues (rows with
``candidate`` true) and their cutouts ``transient/png_image/<science stem>.<ID>.{sci,ref,sub}.png``.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from gppy.fitsio import BadInputError, read_header, write_text

log = logging.getLogger(__name__)

CUTOUT_TAGS = ("sci", "ref", "sub")
TRANSIENT_CAT = ".subt.transient.cat"
#: Stages in pipeline order with the label the report and the dashboard give them.
STAGE_LABELS = [
    ("calib", "calibration"),
    ("astrometry", "astrometry"),
    ("phot_single", "photometry (singles)"),
    ("stack", "stacking"),
    ("phot_stack", "photometry (stacks)"),
    ("subtract", "subtraction"),
    ("phot_difference", "transient search"),
]


# ------------------------------------------------------------------------ QA of one image
def _num(header, *keys: str) -> float | None:
    for key in keys:
        value = header.get(key)
        if isinstance(value, bool) or value is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and not (key.startswith(("ZP", "UL")) and v == 0.0):
            return v
    return None


def image_qa(path: str | Path, kind: str = "single") -> dict | None:
    """Seeing [arcsec], zero point [AB mag] and 5-sigma depth [AB mag] of one image.

    Parameters
    ----------
    path
        A photometered image (single frame or stack).
    kind
        ``single`` or ``stack`` (copied into the result).

    Returns
    -------
    dict or None
        ``path, name, kind, object, filter, date_obs, mjd, exptime, seeing, zp, ezp, depth,
        ellip``; a figure absent from the header is ``None``. ``None`` when the file cannot
        be read.
    """
    try:
        h = read_header(path)
    except BadInputError as exc:
        log.debug("no QA for %s: %s", path, exc)
        return None
    zp_key = "ZP_TOT" if _num(h, "ZP_TOT") is not None else "ZP_AUTO"
    return {
        "path": str(path), "name": Path(path).name, "kind": kind,
        "object": str(h.get("OBJECT", "")), "filter": str(h.get("FILTER", "")),
        "date_obs": str(h.get("DATE-OBS", "")), "mjd": _num(h, "MJD"), "exptime": _num(h, "EXPTIME"),
        "seeing": _num(h, "SEEING"), "zp": _num(h, zp_key), "ezp": _num(h, f"E{zp_key}"),
        "depth": _num(h, "UL5_1"), "ellip": _num(h, "ELLIP"),
    }


class QaCache:
    """:func:`image_qa` remembered per file until the file changes (size or mtime)."""

    def __init__(self, max_entries: int = 20000):
        self.max_entries = max_entries
        self._rows: dict[str, tuple[tuple[int, int], dict | None]] = {}

    def get(self, path: str | Path, kind: str = "single") -> dict | None:
        p = str(path)
        try:
            st = os.stat(p)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._rows.get(p)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        row = image_qa(p, kind)
        if len(self._rows) >= self.max_entries:
            self._rows.clear()
        self._rows[p] = (stamp, row)
        return row


# ------------------------------------------------------------------------ candidates
def cutout_paths(catalogue: str | Path, cand_id: int) -> dict[str, str]:
    """The existing cutout PNGs of candidate ``cand_id`` of a transient catalogue."""
    cat = Path(catalogue)
    if not cat.name.endswith(TRANSIENT_CAT):
        return {}
    sci_stem = cat.name[: -len(TRANSIENT_CAT)]
    out = {}
    for tag in CUTOUT_TAGS:
        p = cat.parent / "png_image" / f"{sci_stem}.{int(cand_id)}.{tag}.png"
        if p.exists():
            out[tag] = str(p)
    return out


def _cell(row, name: str):
    if name not in row.colnames:
        return None
    value = row[name]
    if np.ma.is_masked(value):
        return None
    if isinstance(value, (bytes, str, np.str_)):
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return v if math.isfinite(v) else None


def read_candidates(catalogue: str | Path) -> list[dict]:
    """The candidates (rows with ``candidate`` true) of one ``*.subt.transient.cat``.

    Returns
    -------
    list of dict
        ``catalogue, id, ra, dec`` [deg], ``label, rb, snr, mag, magerr`` [AB mag, difference
        flux], ``object, filter`` (from the product folder) and ``cutouts`` (tag -> PNG path).
    """
    from astropy.table import Table

    cat = Path(catalogue)
    try:
        t = Table.read(cat, format="ascii.ecsv")
    except Exception as exc:  # missing, partial or not ECSV: nothing to show
        log.debug("no candidates from %s: %s", cat, exc)
        return []
    if "candidate" not in t.colnames or len(t) == 0:
        return []
    keep = np.asarray(np.ma.filled(t["candidate"], False), bool)
    base = cat.parent.parent if cat.parent.name == "transient" else cat.parent
    out = []
    for row in t[keep]:
        cid = int(row["ID"]) if "ID" in t.colnames else 0
        out.append({
            "catalogue": str(cat), "id": cid, "ra": _cell(row, "ALPHA_J2000"), "dec": _cell(row, "DELTA_J2000"),
            "label": _cell(row, "label") or "", "rb": _cell(row, "rb"), "snr": _cell(row, "snr_psf"),
            "mag": _cell(row, "MAG_DIFF"), "magerr": _cell(row, "MAGERR_DIFF"),
            "object": base.parent.parent.name, "filter": base.name, "cutouts": cutout_paths(cat, cid),
        })
    return out


class CandidateCache:
    """:func:`read_candidates` remembered per catalogue until it changes."""

    def __init__(self):
        self._rows: dict[str, tuple[tuple[int, int], list[dict]]] = {}

    def get(self, catalogue: str | Path) -> tuple[float, list[dict]]:
        """``(modification time [Unix s], candidates)``; ``(0, [])`` when absent."""
        p = str(catalogue)
        try:
            st = os.stat(p)
        except OSError:
            return 0.0, []
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._rows.get(p)
        if hit is None or hit[0] != stamp:
            hit = (stamp, read_candidates(p))
            self._rows[p] = hit
        return st.st_mtime, hit[1]


# ------------------------------------------------------------------------ what a summary names
def night_images(summary: dict) -> list[tuple[str, str]]:
    """``(path, kind)`` of the singles and stacks a night summary lists."""
    prods = summary.get("products", {})
    return [(p, "single") for p in prods.get("singles", [])] + [(p, "stack") for p in prods.get("stacks", [])]


def night_catalogues(summary: dict) -> list[str]:
    """The transient catalogues a night summary lists."""
    return [c for c in summary.get("products", {}).get("catalogues", []) if c.endswith(TRANSIENT_CAT)]


def report_path(summary_path: str | Path) -> Path:
    """``<path_processed>/nights/<night_id>.html`` beside the summary JSON."""
    return Path(summary_path).with_suffix(".html")


def report_link(night_id: str, path: str | Path, public_url: str | None = None) -> str:
    """What the Slack message names: the watcher's URL of the report, or its file path."""
    if public_url:
        return f"{public_url.rstrip('/')}/nights/{night_id}/report"
    return str(path)


# ------------------------------------------------------------------------ statistics and plots
def qa_by_filter(rows: list[dict]) -> list[dict]:
    """Per (kind, filter): number of images and the median seeing, zero point and depth."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["filter"])].append(r)
    out = []
    for (kind, filt), rs in sorted(groups.items()):
        entry = {"kind": kind, "filter": filt, "n": len(rs)}
        for key in ("seeing", "zp", "depth"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            entry[key] = float(np.median(vals)) if vals else None
        out.append(entry)
    return out


def qa_plot_png(rows: list[dict], title: str = "") -> bytes | None:
    """Seeing, zero point and depth against time, one colour per filter (PNG bytes).

    Singles are dots, stacks squares. ``None`` when no image has a time and a figure.
    """
    pts = [r for r in rows if r.get("mjd") is not None and any(r.get(k) is not None for k in ("seeing", "zp", "depth"))]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r["mjd"] for r in pts)
    filters = sorted({r["filter"] for r in pts})
    colours = plt.get_cmap("tab10" if len(filters) <= 10 else "tab20")
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    for ax, (key, label) in zip(axes, (("seeing", "seeing [arcsec]"), ("zp", "zero point [AB mag]"),
                                       ("depth", "5σ depth UL5_1 [AB mag]")), strict=True):
        for i, filt in enumerate(filters):
            for kind, marker, size in (("single", "o", 14), ("stack", "s", 36)):
                sel = [r for r in pts if r["filter"] == filt and r["kind"] == kind and r.get(key) is not None]
                if sel:
                    ax.scatter([(r["mjd"] - t0) * 24.0 for r in sel], [r[key] for r in sel], s=size, marker=marker,
                               color=colours(i % colours.N),
                               label=f"{filt} ({kind}s)" if key == "seeing" else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=4, loc="best")
    axes[-1].set_xlabel(f"hours since MJD {t0:.5f}")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left}
th{background:#f3f3f3}.ok{color:#176c2f}.failed{color:#b00020}.muted{color:#777}
.cands{display:flex;flex-wrap:wrap;gap:1em}.cand{border:1px solid #ddd;padding:.5em}
.cand img{width:96px;height:96px;image-rendering:pixelated;margin-right:2px;background:#000}
code{font-size:.85em}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _f(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def build_report(summary: dict, qa: list[dict], candidates: list[dict], report_dir: str | Path,
                 max_candidates: int = 200) -> str:
    """The report page of one night.

    Parameters
    ----------
    summary
        The night summary (what :mod:`gppy_watcher.endofnight` writes as JSON).
    qa
        :func:`image_qa` rows of the night's singles and stacks.
    candidates
        :func:`read_candidates` rows; cutouts are linked relative to ``report_dir``.
    report_dir
        The folder the page is written into.
    max_candidates
        At most this many candidates are shown (the count says how many there are).
    """
    s = summary
    status = s.get("status", "?")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(s.get('night_id'))}</title>"
             f"<style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>Night {_e(s.get('night_id'))}: <span class='{_e(status)}'>{_e(status)}</span></h1>")
    info = [["unit", _e(s.get("unit"))], ["night folder", f"<code>{_e(s.get('night_dir'))}</code>"],
            ["lane", _e(s.get("lane"))], ["note", _e(s.get("note"))],
            ["queued / started / finished (UTC)",
             f"{_e(s.get('queued'))} / {_e(s.get('started'))} / {_e(s.get('finished'))}"],
            ["duration", f"{(s.get('duration_s') or 0) / 60:.1f} min"],
            ["run / attempt", f"{_e(s.get('run'))} / {_e(s.get('attempt'))} ({_e(s.get('attempts_in_run'))} in this run)"],
            ["restriction", f"targets={_e(s.get('targets') or 'all')} filters={_e(s.get('filters') or 'all')}"],
            ["pipeline version", _e(s.get("pipeline_version"))]]
    parts.append(_table(["", ""], info))

    # ---- stages
    fr = s.get("frames", {})
    parts.append("<h2>Stages</h2>")
    parts.append(f"<p>{_e(fr.get('planned', 0))} frames planned, {_e(len(fr.get('rejected', {}) or {}))} rejected, "
                 f"{_e(fr.get('skipped_by_restriction', 0))} skipped by the restriction.</p>")
    stages, timings = s.get("stages", {}), s.get("timings", {})
    rows = []
    for key, label in STAGE_LABELS:
        c, t = stages.get(key, {}), timings.get(key, {})
        rows.append([_e(label), _e(c.get("done", 0)), _e(c.get("failed", 0)),
                     _e(c.get("no_reference", "")), _e(t.get("outputs", "")), _e(t.get("first_output", "")),
                     _e(t.get("last_output", "")), _f(t.get("span_s"), 1) if t else "–"])
    parts.append(_table(["stage", "done", "failed", "no reference", "events", "first output", "last output",
                         "span [s]"], rows))

    # ---- QA
    parts.append("<h2>Quality (seeing, zero point, depth)</h2>")
    png = qa_plot_png(qa, str(s.get("night_id", "")))
    if png is not None:
        parts.append(f"<img class='qa' alt='QA plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    else:
        parts.append("<p class='muted'>No photometered image.</p>")
    parts.append(_table(["images", "filter", "n", "median seeing [arcsec]", "median ZP [AB]", "median depth [AB]"],
                        [[_e(g["kind"] + "s"), _e(g["filter"]), _e(g["n"]), _f(g["seeing"]), _f(g["zp"], 3),
                          _f(g["depth"])] for g in qa_by_filter(qa)], "qa-by-filter"))
    singles = [r for r in qa if r["kind"] == "single"]
    if singles:
        parts.append("<details><summary>Every frame</summary>")
        parts.append(_table(["frame", "filter", "DATE-OBS", "seeing", "ZP", "depth"],
                            [[f"<code>{_e(r['name'])}</code>", _e(r["filter"]), _e(r["date_obs"]), _f(r["seeing"]),
                              _f(r["zp"], 3), _f(r["depth"])] for r in singles], "qa-frames"))
        parts.append("</details>")

    # ---- stacks and subtractions
    prods = s.get("products", {})
    stacks = [r for r in qa if r["kind"] == "stack"]
    parts.append(f"<h2>Stacks ({len(prods.get('stacks', []))})</h2>")
    if prods.get("stacks"):
        by_path = {r["path"]: r for r in stacks}
        parts.append(_table(["stack", "object", "filter", "seeing", "ZP", "depth"],
                            [[f"<code>{_e(Path(p).name)}</code>", _e(by_path.get(p, {}).get("object")),
                              _e(by_path.get(p, {}).get("filter")), _f(by_path.get(p, {}).get("seeing")),
                              _f(by_path.get(p, {}).get("zp"), 3), _f(by_path.get(p, {}).get("depth"))]
                             for p in prods["stacks"]], "stacks"))
    diffs = prods.get("differences", [])
    noref = s.get("no_reference", {}) or {}
    parts.append(f"<h2>Subtractions ({len(diffs)} differences, {len(noref)} without a reference)</h2>")
    if diffs:
        parts.append("<ul>" + "".join(f"<li><code>{_e(Path(p).name)}</code></li>" for p in diffs) + "</ul>")
    if noref:
        parts.append(_table(["stack", "reason"], [[f"<code>{_e(Path(k).name)}</code>", _e(v)]
                                                   for k, v in noref.items()], "noref"))

    # ---- candidates
    parts.append(f"<h2>Transient candidates ({len(candidates)})</h2>")
    if candidates:
        cells = []
        for c in candidates[:max_candidates]:
            imgs = "".join(
                f"<img alt='{tag}' title='{tag}' src='{_e(os.path.relpath(c['cutouts'][tag], report_dir))}'>"
                for tag in CUTOUT_TAGS if tag in c["cutouts"])
            cells.append(f"<div class='cand' data-id='{_e(c['id'])}'><div>{imgs}</div>"
                         f"<div><b>#{_e(c['id'])}</b> {_e(c['label'])} {_e(c['object'])} {_e(c['filter'])}</div>"
                         f"<div>RA {_f(c['ra'], 5)} Dec {_f(c['dec'], 5)}</div>"
                         f"<div>mag {_f(c['mag'], 2)} ± {_f(c['magerr'], 2)} · rb {_f(c['rb'], 2)}</div></div>")
        parts.append("<div class='cands'>" + "".join(cells) + "</div>")
        if len(candidates) > max_candidates:
            parts.append(f"<p class='muted'>{len(candidates) - max_candidates} more not shown.</p>")
    else:
        parts.append("<p class='muted'>None.</p>")

    # ---- failures
    groups = s.get("failures", []) or []
    failed_frames = fr.get("failed", []) or []
    lost = s.get("outstanding_at_end", []) or []
    parts.append(f"<h2>Failures ({sum(g.get('count', 0) for g in groups)})</h2>")
    if groups:
        parts.append(_table(["stage", "reason", "count", "items"],
                            [[_e(g.get("stage")), _e(g.get("reason")), _e(g.get("count")),
                              "<br>".join(f"<code>{_e(Path(i).name)}</code>" for i in g.get("items", [])[:10])]
                             for g in groups], "failures"))
    if failed_frames:
        parts.append("<h3>Frames that did not come through</h3>")
        parts.append(_table(["frame", "reason"], [[f"<code>{_e(Path(f['path']).name)}</code>", _e(f["reason"])]
                                                  for f in failed_frames], "failed-frames"))
    if lost:
        parts.append("<h3>Never reported (the night stalled)</h3><ul>"
                     + "".join(f"<li><code>{_e(x)}</code></li>" for x in lost) + "</ul>")
    if not (groups or failed_frames or lost):
        parts.append("<p class='ok'>None.</p>")
    if s.get("header_problems"):
        parts.append(f"<p class='muted'>{len(s['header_problems'])} header snapshot problem(s).</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def gather(summary: dict, qa_cache: QaCache | None = None,
           cand_cache: CandidateCache | None = None) -> tuple[list[dict], list[dict]]:
    """The QA rows and candidates (newest catalogue first) of the products a summary lists."""
    qa_cache = qa_cache or QaCache()
    cand_cache = cand_cache or CandidateCache()
    qa = [r for p, kind in night_images(summary) if (r := qa_cache.get(p, kind)) is not None]
    cats = []
    for c in night_catalogues(summary):
        mtime, rows = cand_cache.get(c)
        cats.append((mtime, rows))
    candidates = [row for _, rows in sorted(cats, key=lambda x: -x[0]) for row in rows]
    return qa, candidates


def write_report(summary: dict, summary_path: str | Path) -> Path:
    """Write the night's report beside its summary (atomically); returns its path."""
    dest = report_path(summary_path)
    qa, candidates = gather(summary)
    write_text(dest, build_report(summary, qa, candidates, dest.parent))
    return dest
