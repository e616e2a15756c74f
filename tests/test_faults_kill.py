"""SIGKILL of every stage's worker in the middle of a job, repeatedly, during one simulated
night on the local stack (real nats-server, the six services as processes).

Each kill takes the worker's whole process tree (its Source Extractor/SCAMP/SWarp children
too), as a container kill does, and a new worker is started at once. The message it held
comes back after the acknowledgement wait. The night must end exactly as an undisturbed
night: every frame and visit in its final state once, no half-written product, the ledger
right, Slack told of the start and the end once and of no failure, the raw tree unchanged, and
the products still right against the simulator's truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_faults import (  # noqa: E402
    Pipeline,
    _singles,
    assert_clean,
    audit,
    run_once,
    save_figures,
    simulate_night,
    tree_checksums,
)

pytestmark = pytest.mark.slow

#: Seconds into a job at which each stage's worker is killed (a small frame's job lasts
#: 0.3-2 s on an idle machine, so the first kill of each stage comes early). Calib holds one
#: message for the whole night: first early in it (while it builds the masters), then in the
#: redelivered job once some frames were announced (a fast machine may have reduced them all
#: before the kill can be made: that kill is then reported as missed).
DELAYS = {"calib": [0.2, "some frames announced"], "astrometry": [0.0, 0.2], "phot": [0.3, 1.0, 0.1],
          "stack": [0.2, 1.0], "subtract": [0.5, 2.0], "watcher": [0.0, 0.0]}


@pytest.fixture(scope="module")
def killed_night(tmp_path_factory):
    return run_once(__name__, lambda: _killed_night(tmp_path_factory))


def _killed_night(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-kill")
    night = simulate_night(root / "data", seed=5)
    raw_before = tree_checksums(night.night_dir)
    pipe = Pipeline(night, root / "run")
    try:
        pipe.start()

        def announced():
            """after some of its frames were announced"""
            return len(_singles(night.processed)) >= 1

        delays = {s: [announced if d == "some frames announced" else d for d in v] for s, v in DELAYS.items()}
        missed = pipe.kill_while_busy(delays)
        rec = pipe.wait_terminal(timeout=900)
        result = audit("SIGKILL of each stage's worker mid-job", night, pipe, rec, raw_before)
    finally:
        pipe.close()
    save_figures(result, {"missed": missed})
    return result, missed


def test_every_stage_was_killed_mid_job(killed_night):
    a, missed = killed_night
    killed = {f["target"] for f in a.faults}
    assert killed == {"watcher", "calib", "astrometry", "phot", "stack", "subtract"}, (killed, missed)
    assert len(a.faults) >= 10, (len(a.faults), missed)


def test_night_ends_as_if_nothing_happened(killed_night):
    a, _ = killed_night
    assert_clean(a)


def test_products_still_right_against_the_truth(killed_night):
    a, _ = killed_night
    assert a.astrometry_worst_arcsec < 0.10, a.astrometry_worst_arcsec
    # an undisturbed night of this size is within 0.05 mag of the truth (test_e2e_local checks
    # accuracy); a frame whose photometry was lost or applied twice has no ZP or is far off
    assert a.zp_worst_mag < 0.05, a.zp_worst_mag


def test_every_kill_was_recovered_from(killed_night):
    a, _ = killed_night
    assert all(f["recovered_s"] is not None for f in a.faults), a.faults
