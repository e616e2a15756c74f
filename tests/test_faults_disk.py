"""The data volume full (ENOSPC) for a while in the middle of a night, then freed, while
Slack is unreachable; on the local stack.

The processed tree and the scratch folder live on a small tmpfs (mounted by the test; it runs
as root). When astrometry is at work, a ballast file fills the volume; every write of every
stage then fails with ENOSPC. The ballast is removed after a while, and Slack comes back a bit
later. The stages must wait for space rather than give up, so the night ends as an undisturbed
night: nothing lost, nothing twice, nothing half-written left under a final name, the ledger
right; the disk-full episode is reported once; Slack's absence delays messages, never the
night.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_faults import (  # noqa: E402
    Fault,
    Pipeline,
    SmallVolume,
    assert_clean,
    audit,
    run_once,
    save_figures,
    simulate_night,
    tree_checksums,
)

pytestmark = pytest.mark.slow

FULL_S = 30.0        # the volume stays full this long (longer than every retry of a message)
SLACK_AFTER_S = 10.0  # Slack comes back this long after the volume was freed


@pytest.fixture(scope="module")
def full_disk_night(tmp_path_factory):
    return run_once(__name__, lambda: _full_disk_night(tmp_path_factory))


def _full_disk_night(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-disk")
    vol = SmallVolume(root / "vol", size_mb=400).mount()
    try:
        night = simulate_night(root / "data", seed=5, volume=vol.where)
        raw_before = tree_checksums(night.night_dir)
        pipe = Pipeline(night, root / "run")
        try:
            pipe.start()
            assert pipe.wait_busy("astrometry"), "astrometry never started"
            t0 = time.time()
            ballast = vol.fill()
            slack = pipe.slack_down()
            # a stage whose write failed removes its temporary file and frees space: fill it too;
            # below the stages' own threshold every one of them holds
            ballast += vol.fill()
            assert vol.free_bytes() < pipe.settings.min_free_mb * 1e6, vol.free_bytes()
            time.sleep(FULL_S)
            vol.free()
            disk = Fault("enospc", "volume", t0, time.time(), f"{ballast / 1e6:.0f} MB ballast, full {FULL_S:.0f} s")
            pipe.faults.append(disk)
            time.sleep(SLACK_AFTER_S)
            pipe.slack_up(slack)
            rec = pipe.wait_terminal(timeout=900)
            late = pipe.wait_slack("Processing complete", "data volume full", "space available again")
            assert not late, f"never reached Slack: {late}"
            result = audit("data volume full (ENOSPC) for a while, Slack unreachable", night, pipe, rec,
                           raw_before)
            logs = pipe.logs()
        finally:
            pipe.close()
    finally:
        vol.unmount()
    save_figures(result)
    return result, logs


def test_the_volume_was_full_and_slack_down_mid_night(full_disk_night):
    a, logs = full_disk_night
    assert [f["kind"] for f in a.faults] == ["slack-unreachable", "enospc"]
    # a write that hit the full volume (ENOSPC), or a stage that saw it full before writing and held
    assert "No space left on device" in logs or "no space left:" in logs


def test_night_ends_as_if_nothing_happened(full_disk_night):
    a, _ = full_disk_night
    assert_clean(a)


def test_the_full_disk_was_reported_once_when_slack_came_back(full_disk_night):
    a, logs = full_disk_night
    assert len(a.slack_disk) == 2, a.slack_disk
    assert "data volume full" in a.slack_disk[0] and "space available again" in a.slack_disk[1]
    stages_waiting = {line.split('"stage": "')[1].split('"')[0] for line in logs.splitlines()
                      if "no space left:" in line and '"stage": "' in line}
    assert "watcher" in stages_waiting


def test_products_still_right_against_the_truth(full_disk_night):
    a, _ = full_disk_night
    assert a.astrometry_worst_arcsec < 0.10, a.astrometry_worst_arcsec
    assert a.zp_worst_mag < 0.05, a.zp_worst_mag
