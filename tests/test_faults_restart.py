"""The NATS server restarted in the middle of a night, then the whole stack stopped and started
(SIGTERM, as ``gppy up`` does on Ctrl-C) later in the same night, on the local stack.

The services ride out the broker's absence (they reconnect for ever); JetStream keeps the
stream, the consumers and the ledger on disk. After the whole stack comes back, the work held
at the stop is redelivered. The night must end as an undisturbed night would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_faults import (  # noqa: E402
    Pipeline,
    assert_clean,
    audit,
    run_once,
    save_figures,
    simulate_night,
    tree_checksums,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def restarted_night(tmp_path_factory):
    return run_once(__name__, lambda: _restarted_night(tmp_path_factory))


def _restarted_night(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-restart")
    night = simulate_night(root / "data", seed=5)
    raw_before = tree_checksums(night.night_dir)
    pipe = Pipeline(night, root / "run")
    try:
        pipe.start()
        assert pipe.wait_busy("astrometry"), "astrometry never started"
        pipe.restart_nats(down_s=3.0)
        assert pipe.wait_busy("stack", timeout=400), "stacking never started"
        pipe.restart_all()
        rec = pipe.wait_terminal(timeout=900)
        result = audit("NATS restart, then the whole stack restarted", night, pipe, rec, raw_before)
    finally:
        pipe.close()
    save_figures(result)
    return result


def test_both_restarts_happened_mid_night(restarted_night):
    a = restarted_night
    assert [f["kind"] for f in a.faults] == ["nats-restart", "stack-restart"]
    assert all(f["recovered_s"] is not None for f in a.faults), a.faults


def test_night_ends_as_if_nothing_happened(restarted_night):
    assert_clean(restarted_night)


def test_products_still_right_against_the_truth(restarted_night):
    a = restarted_night
    assert a.astrometry_worst_arcsec < 0.10, a.astrometry_worst_arcsec
    assert a.zp_worst_mag < 0.05, a.zp_worst_mag
