"""Slack notifications (gppy.notify) against a local HTTP server standing in for Slack's Web API
(slack-sdk's base_url): delivery, back-off through an outage, dropping after the last try, a
bad token, rate limiting, and a whole night processed while Slack is down."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest_watcher import (  # noqa: E402
    UNIT,
    Publisher,
    SimNight,
    SlackStandIn,
    dones,
    night_dir,
    readies,
    running_watcher,
    wait_for,
    watcher_settings,
    write_raw,
)

from gppy import naming  # noqa: E402
from gppy.config import Settings  # noqa: E402
from gppy.notify import SlackNotifier, slack_token  # noqa: E402


def notifier(stand_in: SlackStandIn, token: str | None = None, **kw) -> SlackNotifier:
    opts = dict(max_tries=4, backoff_s=0.2, max_backoff_s=1.0, timeout_s=5)
    opts.update(kw)
    return SlackNotifier(token or stand_in.token, "#pipeline", stand_in.base_url, **opts)


async def test_messages_are_delivered_in_order_to_the_channel():
    stand_in = SlackStandIn().up()
    n = notifier(stand_in)
    try:
        for i in range(3):
            assert n.post(f"message {i}") is True
        assert await n.flush(20)
    finally:
        await n.close()
        stand_in.down()
    assert stand_in.texts() == ["message 0", "message 1", "message 2"]
    assert {m["channel"] for m in stand_in.messages} == {"#pipeline"}
    assert (n.sent, n.dropped) == (3, 0)


async def test_an_outage_is_ridden_out_with_back_off(caplog):
    stand_in = SlackStandIn().up()
    stand_in.down()  # Slack unreachable: connection refused
    n = notifier(stand_in, max_tries=30, backoff_s=0.2, max_backoff_s=0.5)
    caplog.set_level(logging.INFO, logger="gppy.notify")
    try:
        assert n.post("sent during the outage") is True  # returns at once, nothing blocks
        await wait_for(lambda: sum("slack attempt" in r.message for r in caplog.records) >= 2, 30,
                       "two failed attempts")
        stand_in.up()  # Slack is back, on the same address
        assert await n.flush(30)
    finally:
        await n.close()
        stand_in.down()
    assert stand_in.texts() == ["sent during the outage"]
    assert (n.sent, n.dropped) == (1, 0)


async def test_a_long_outage_drops_the_message_with_a_log_line_then_recovers(caplog):
    stand_in = SlackStandIn().up()
    stand_in.down()
    n = notifier(stand_in, max_tries=3, backoff_s=0.1)
    caplog.set_level(logging.INFO, logger="gppy.notify")
    try:
        n.post("lost to the outage")
        assert await n.flush(30)
        dropped = [r for r in caplog.records if "unreachable after 3 tries" in r.message]
        assert len(dropped) == 1 and "lost to the outage" in dropped[0].message
        assert dropped[0].levelno == logging.WARNING
        stand_in.up()
        n.post("after the outage")
        assert await n.flush(30)
    finally:
        await n.close()
        stand_in.down()
    assert stand_in.texts() == ["after the outage"]
    assert (n.sent, n.dropped) == (1, 1)


async def test_a_bad_token_is_not_retried_and_never_raises(caplog):
    stand_in = SlackStandIn().up()
    n = notifier(stand_in, token="xoxb-wrong")
    caplog.set_level(logging.INFO, logger="gppy.notify")
    try:
        n.post("with a bad token")
        assert await n.flush(20)
    finally:
        await n.close()
        stand_in.down()
    assert stand_in.requests == 1 and stand_in.messages == []
    assert any("invalid_auth" in r.message and "not retried" in r.message for r in caplog.records)
    assert n.dropped == 1


async def test_rate_limit_and_server_errors_are_retried():
    stand_in = SlackStandIn().up()
    stand_in.answers = [429, 503]
    n = notifier(stand_in, backoff_s=0.1)
    try:
        n.post("eventually")
        assert await n.flush(30)
    finally:
        await n.close()
        stand_in.down()
    assert stand_in.requests == 3 and stand_in.texts() == ["eventually"]


async def test_identical_messages_collapse_under_one_key():
    stand_in = SlackStandIn().up()
    n = notifier(stand_in)
    try:
        results = [n.post(f"phot failed on frame {i}", key="night|phot|stars") for i in range(5)]
        assert await n.flush(20)
    finally:
        await n.close()
        stand_in.down()
    assert results == [True, False, False, False, False]
    assert stand_in.texts() == ["phot failed on frame 0"] and n.collapsed("night|phot|stars") == 4


def test_token_from_settings_or_v1_keys_dat(tmp_path, monkeypatch):
    keys = tmp_path / "keys.dat"
    keys.write_text("name key pw\nTNS abc -\nslack xoxb-from-keys-dat -\n")
    monkeypatch.delenv("GPPY_SLACK_TOKEN", raising=False)
    assert slack_token(Settings(keys_file=keys)) == "xoxb-from-keys-dat"
    assert slack_token(Settings(keys_file=keys, slack_token="xoxb-explicit")) == "xoxb-explicit"
    assert slack_token(Settings(keys_file=tmp_path / "absent.dat")) is None
    assert SlackNotifier.from_settings(Settings(keys_file=tmp_path / "absent.dat")).post("only logged") is False


async def test_a_slack_outage_during_a_night_never_blocks_processing(settings, caplog):
    stand_in = SlackStandIn().up()
    s = watcher_settings(settings)
    d = night_dir(s, "2025-01-12_gain2750")
    for i in range(3):
        write_raw(d, i)
    nid = naming.night_id(UNIT, d)
    caplog.set_level(logging.INFO, logger="gppy.notify")
    n = notifier(stand_in, max_tries=2, backoff_s=0.2)
    async with running_watcher(s, notifier=n) as svc, Publisher(s) as pub:
        ready = (await wait_for(lambda: readies(s, nid), 60, "the night to be queued"))[0]
        sim = SimNight.make(s, ready, {"A": [0, 1, 2]})
        events = sim.all_events()
        await pub(events[0])
        await wait_for(lambda: stand_in.messages, 30, "the start message")
        stand_in.down()  # Slack goes away in the middle of the night
        f = sim.frames[2]
        events[7:10] = [sim.calibrated(f), sim.solved(f, ok=False, reason="no astrometric solution"),
                        sim.phot(f.calib, "single", ok=False, reason="no WCS")]
        await pub(*events[1:])
        done = await wait_for(lambda: dones(s, nid), 60, "the night to end while Slack is down")
        assert done[0].status == "done"
        await wait_for(lambda: n.dropped >= 2, 60, "the failure and finish messages to be dropped")
        stand_in.up()
        svc.notifier.post("after the outage")
        assert await svc.notifier.flush(20)
    stand_in.down()
    texts = stand_in.texts()
    assert len(texts) == 2 and texts[0].startswith("[gpPy/7DT] Start processing 7DT01 2025-01-12_gain2750")
    assert texts[1] == "after the outage"
    dropped = [r.message for r in caplog.records if "unreachable after 2 tries" in r.message]
    assert len(dropped) == 2
    assert any("astrometry failed on " + f.calib.name in m for m in dropped)
    assert any("Processing complete" in m for m in dropped)
