"""The bad-input corpus (tests/badinput/manifest.json) thrown at one simulated night, on the
local stack with the deployment's NATS users (every service logs in as itself, with only its
own subject permissions: deploy/nats/users.conf).

A three-target night gets every bad file of the corpus next to its good frames, its targets'
reference data are damaged (one loses its catalogue, one its reference image, one its proper
motions), and two more night folders are added (only calibration frames; science frames of a
unit with an empty master archive). Each case must end as its manifest says, with a clear
reason in the ledger's night summary and in the logs, one Slack line per failure; the rest of
the night is processed; no input file is changed; no header value reaches a shell or a path
outside the data roots.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "badinput"))

import corpus  # noqa: E402
from conftest_faults import (  # noqa: E402
    Pipeline,
    _final_single,
    _provin,
    _stacks,
    ledger_record,
    run_once,
    save_figures,
    simulate_night,
    tree_checksums,
)
from conftest_faults import audit as audit_night  # noqa: E402

pytestmark = pytest.mark.slow

CASES = corpus.manifest()
CALIB_ONLY = "7DT01_2025-01-14_gain2750"
NO_ARCHIVE = "7DT02_2025-01-15_gain2750"


@pytest.fixture(scope="module")
def bad_night(tmp_path_factory):
    return run_once(__name__, lambda: _bad_night(tmp_path_factory))


def _bad_night(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    night = simulate_night(root / "data", seed=5, targets=3)
    paths = night.paths()
    marker = Path(f"/tmp/gppy-pwned-{os.getpid()}")
    maker = corpus.Maker(night.night_dir, night.root, night.truth, paths, marker)
    made = {c["id"]: getattr(maker, c["make"])() for c in CASES}
    obsdata = Path(paths.path_obsdata)
    raw_before = tree_checksums(obsdata)
    main_before = tree_checksums(night.night_dir)
    before = {str(p) for p in night.root.rglob("*")}
    pipe = Pipeline(night, root / "run", env={"GPPY_UNITS": '["7DT01", "7DT02"]'}, secure=True)
    ids = [night.night_id, CALIB_ONLY, NO_ARCHIVE]
    try:
        pipe.start()
        bad_messages = asyncio.run(publish_bad_messages(pipe, night, root))
        deadline = time.monotonic() + 900
        while True:
            recs = {i: asyncio.run(ledger_record(pipe.settings, i)) for i in ids}
            if all(r and r["state"] in ("done", "failed") and "message" in r["final_steps"] for r in recs.values()):
                break
            assert time.monotonic() < deadline, f"nights not finished: {recs}"
            time.sleep(2)
        no_catalogue = made["missing-catalogue"][0]  # its frames cannot be solved: lost on purpose
        expect_lost = {f["file"] for f in night.truth["frames"] if f["kind"] == "science"
                       and f["object"] == no_catalogue}
        result = audit_night("bad-input corpus", night, pipe, recs[night.night_id], main_before,
                             expect_lost=expect_lost, truth_quality=False)
        events = pipe.events()
        logs = pipe.logs() + "\n".join(p.read_text(errors="replace") for p in Path(paths.path_log).rglob("*.log"))
    finally:
        pipe.close()
    result.bad_inputs = sum(len(v) for v in made.values())
    save_figures(result, {"scenario": f"bad-input corpus ({len(CASES)} cases, 3 nights)"})
    summaries = {i: json.loads(Path(r["summary_path"]).read_text()) for i, r in recs.items()}
    plan = next(b for _, _, b in events if b.get("kind") == "night.plan" and b["night_id"] == night.night_id)
    calib_of = {f["raw_path"]: f["calib_path"] for f in plan["frames"]}
    after = {str(p) for p in night.root.rglob("*") if not p.is_symlink()}
    return {"night": night, "paths": paths, "made": made, "recs": recs, "summaries": summaries,
            "slack": [m["text"] for m in pipe.slack.messages], "logs": logs, "calib_of": calib_of,
            "raw_before": raw_before, "raw_after": tree_checksums(obsdata), "marker": marker,
            "new_files": sorted(after - before), "audit": result, "bad_messages": bad_messages,
            "dead_letters": [(subj, b) for _, subj, b in events if ".dlq." in subj]}


async def publish_bad_messages(pipe, night, root: Path) -> dict:
    """Bad messages straight onto the bus (as the operator) while the night runs; returns
    {name: expected dead-letter reason} and whether a replay was de-duplicated."""
    from gppy import bus
    from gppy.messages import NightReady

    outside = root / "outside"
    outside.mkdir()
    link = Path(night.paths().path_obsdata) / "7DT01" / "2025-01-13_gain2750"
    link.symlink_to(outside, target_is_directory=True)
    base = NightReady(night_id="7DT01_2025-01-13_gain2750", unit="7DT01", night_dir=str(link)).model_dump()
    raw = {
        "malformed JSON": (b"{not json", "malformed JSON"),
        "unknown schema version": (json.dumps({**base, "schema_version": 99}).encode(), "unknown schema_version 99"),
        "path outside the roots": (json.dumps({**base, "night_dir": "/etc"}).encode(), "outside the configured data roots"),
        "path with ..": (json.dumps({**base, "night_dir": str(night.night_dir) + "/../../../../etc"}).encode(),
                         "outside the configured data roots"),
        "symbolic link out of the roots": (json.dumps(base).encode(), "outside the configured data roots"),
        "oversized": (json.dumps({**base, "targets": ["T" * 1000] * 1000}).encode(), "exceeds the limit"),
    }
    nc = await bus.connect(pipe.settings, "bad-messages")
    js = nc.jetstream()
    for data, _ in raw.values():
        await js.publish("gppy.survey.night.ready", data)
    # the watcher's own night-ready, published again: JetStream's de-duplication swallows it
    replay = NightReady(night_id=night.night_id, unit="7DT01", night_dir=str(night.night_dir), attempt=1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rec = await ledger_record(pipe.settings, night.night_id)
        if rec and rec.get("published"):
            break
        await asyncio.sleep(0.5)
    ack = await js.publish(replay.subject(), replay.to_bytes(), headers={"Nats-Msg-Id": replay.msg_id()})
    await nc.close()
    return {"expected": {k: v[1] for k, v in raw.items()}, "replay_duplicate": bool(ack.duplicate)}


def _failure(summary: dict, item: str, reason: str) -> dict | None:
    for f in summary["failures"]:
        if reason in f["reason"] and (item in f.get("items", []) or f.get("item") == item):
            return f
    return None


def _one_slack_line(r: dict, *needles: str) -> None:
    lines = [t for t in r["slack"] if all(n in t for n in needles)]
    assert len(lines) == 1, (needles, lines)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_each_bad_input_has_its_outcome(bad_night, case):
    r = bad_night
    exp = case["expect"]
    made = r["made"][case["id"]]
    main = r["summaries"][r["night"].night_id]
    outcome, reason = exp["outcome"], exp["reason"]
    if outcome == "rejected":
        rejected = {p: main["frames"]["rejected"].get(p) for p in made}
        if exp.get("first_processed"):  # one of the copies is used, the others refused
            kept = [p for p, why in rejected.items() if why is None]
            assert len(kept) == 1, rejected
            assert _final_single(Path(r["calib_of"][kept[0]])), kept
            made = [p for p in made if p not in kept]
        for p in made:
            assert reason in (main["frames"]["rejected"].get(p) or ""), (p, main["frames"]["rejected"].get(p))
            assert _failure(main, p, reason), main["failures"]
            _one_slack_line(r, "calib failed on", Path(p).name, reason)
    elif outcome == "failed":
        if case["make"] == "missing_catalogue":
            obj = made[0]
            items = [c for raw, c in r["calib_of"].items() if f"_{obj}_" in Path(raw).name]
            assert len(items) == 3
            _one_slack_line(r, f"{exp['stage']} failed on", f"{reason} {obj}")
        else:
            items = [r["calib_of"][p] for p in made]
            for item in items:
                _one_slack_line(r, "failed on", Path(item).name, reason)
        for item in items:
            f = _failure(main, item, reason)
            assert f is not None, (item, main["failures"])
            assert f["stage"] == exp["stage"], f  # a calib failure passed on by astrometry is calib's
            assert not _final_single(Path(item))
    elif outcome == "processed":
        obj = made[0]
        raws = [raw for raw in r["calib_of"] if f"_{obj}_" in Path(raw).name]
        assert len(raws) == 3 and all(_final_single(Path(r["calib_of"][raw])) for raw in raws)
        inputs = sorted(Path(r["calib_of"][raw]).name for raw in raws)
        stacks = [s for s in _stacks(r["night"].processed) if sorted(_provin(fits.getheader(s))) == inputs]
        assert len(stacks) == 1 and "ZP_AUTO" in fits.getheader(stacks[0])
        assert (stacks[0].parent / "transient" / (stacks[0].name[:-5] + ".subt.fits")).exists()
    elif outcome == "no_reference":
        obj = made[0]
        noref = {k: v for k, v in main["no_reference"].items() if f"_{obj}_" in Path(k).name}
        assert len(noref) == 1 and reason in next(iter(noref.values())), main["no_reference"]
        stack = Path(next(iter(noref)))
        assert "ZP_AUTO" in fits.getheader(stack)  # stacked and photometered all the same
        assert not (stack.parent / "transient" / (stack.name[:-5] + ".subt.fits")).exists()
    elif outcome in ("night_done", "night_failed"):
        nid = CALIB_ONLY if case["make"] == "calibration_only_night" else NO_ARCHIVE
        rec = r["recs"][nid]
        assert rec["state"] == outcome.split("_")[1] and reason in rec["note"], rec
        assert r["summaries"][nid]["status"] == rec["state"]
        unit, name = nid.split("_", 1)
        final = [t for t in r["slack"] if f"{unit} {name}" in t and ("FAILED" in t or "Processing complete" in t)]
        assert len(final) == 1, final
        if exp["stage"] == "calib":  # its frames were refused: told once, reason in the ledger
            assert reason in rec["last_error"], rec
            lines = [t for t in r["slack"] if f"{unit} {name}" in t and "calib failed on" in t and reason in t]
            assert len(lines) == 1, lines
    else:
        raise AssertionError(f"unknown outcome {outcome}")
    if reason:
        assert reason in r["logs"], f"{reason!r} not in the services' logs"


def test_the_rest_of_the_night_is_processed(bad_night):
    r = bad_night
    main = r["summaries"][r["night"].night_id]
    targets = [t["name"] for t in r["night"].truth["targets"]]
    good = [f["file"] for f in r["night"].truth["frames"] if f["kind"] == "science" and f["object"] != targets[0]]
    assert len(good) == 6
    for name in good:
        raw = str(r["night"].night_dir / name)
        assert _final_single(Path(r["calib_of"][raw])), name
    assert r["recs"][r["night"].night_id]["state"] == "done"
    assert main["stages"]["stack"]["done"] == 3  # targets 1 and 2, and the duplicated exposure
    assert main["outstanding_at_end"] == []


def test_no_input_file_changed_or_removed(bad_night):
    r = bad_night
    assert r["raw_before"] == r["raw_after"]


def test_header_values_reach_no_shell_and_no_path_outside_the_roots(bad_night):
    r = bad_night
    assert not r["marker"].exists()
    paths = r["paths"]
    roots = [Path(p).resolve() for p in (paths.path_processed, paths.path_base, paths.path_obsdata)]
    for f in r["new_files"]:
        p = Path(f).resolve()
        assert any(p == root or root in p.parents for root in roots), f
    item = r["calib_of"][r["made"]["object-metacharacters"][0]]
    assert Path(item).resolve().is_relative_to(Path(paths.path_processed).resolve())
    assert all(c.isalnum() or c in "+-._/" for c in item), item  # sanitised: no quote, space, $ or ;


def test_bad_messages_are_dead_lettered_with_their_reason_and_a_replay_is_swallowed(bad_night):
    r = bad_night
    letters = [b for subj, b in r["dead_letters"] if subj == "gppy.dlq.calib"]
    reasons = [b.get("reason", "") for b in letters]
    for name, reason in r["bad_messages"]["expected"].items():
        assert sum(reason in x for x in reasons) >= 1, (name, reasons)
    assert len(letters) == len(r["bad_messages"]["expected"]), reasons  # each once, not retried
    assert r["bad_messages"]["replay_duplicate"]
    assert r["recs"][r["night"].night_id]["run_attempts"] == 1 and r["recs"][r["night"].night_id]["run"] == 1


def test_every_failure_line_is_sent_once(bad_night):
    r = bad_night
    lines = [t for t in r["slack"] if " failed on " in t or "FAILED" in t]
    assert len(lines) == len(set(lines)), lines
    assert len(r["audit"].slack_failures) >= 15
    assert not r["audit"].frames_lost and not r["audit"].duplicate_products, r["audit"]
