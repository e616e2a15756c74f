"""Transient candidates on the pipeline's own differences of a simulated night, against truth.

A night of the simulator (gppy.sim: two targets, one filter, 1280 x 900 frames, 24 injected
transients per target with design S/N 3-100, some 3-8" from bright stars, a fading source
and a moving object on the first target; a deep 7DT reference for the first target and a
PS1-like reference, sharper or blurrier than the science, for the second) goes through the
pipeline's science from the calibrated singles on (``conftest_phot.run_sim_night``): the phot
stage's photometry of every single, the stack stage's stack of every visit, photometry of the
stacks, the subtract stage's difference against the reference (native engine) and the phot
stage's transient search. The calib and astrometry stages are stood in for by the truth.

Every injected transient is given the S/N that PSF-optimal photometry reaches on the
difference, from its true flux and the difference's noise at its place
(``conftest_phot.evaluate_difference``; the noise's correlation measured on the difference
itself). The acceptance figures of the issue are asserted with tolerances from counting
statistics: a figure fails when the count observed would be less likely than 1 % were the
acceptance rate the true one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom, poisson

_spec = importlib.util.spec_from_file_location("conftest_phot", Path(__file__).with_name("conftest_phot.py"))
cp = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("conftest_phot", cp)
_spec.loader.exec_module(cp)

SEED = 21
FULL_AREA_PX = 10200 * 6800          # a full-size stack
FALSE_PER_FULL_STACK = 5.0           # acceptance: false candidates per full-size stack
ALPHA = 0.01                         # one-sided tolerance of every counting test


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("simtransients")
    pj, runs = cp.run_sim_night(root, SEED, size=(1280, 900), targets=2, n_transients=24)
    truth = pj.parent / "truth"
    evals = [cp.evaluate_difference(e, truth) for e in runs if e["event"] is not None]
    return runs, evals


def _static(evals):
    rows = [r for ev in evals for r in ev["rows"] if r["kind"] in ("static", "near_bright")]
    snr = np.array([r["snr"] for r in rows])
    found = np.array([r["found"] for r in rows])
    return rows, np.nan_to_num(snr), found


def test_every_visit_is_differenced(night):
    runs, evals = night
    assert len(runs) == 4
    assert all(e["event"] is not None for e in runs), [e.get("error") for e in runs]
    # the difference keeps most of the science stack's data: masked pixels of the convolved
    # image spoil only the difference pixels where their light matters (growing every masked
    # pixel by the kernel footprint lost 15-45 % of these stacks)
    from astropy.io import fits

    for e, ev in zip(runs, evals, strict=True):
        valid = int(np.sum(fits.getdata(e["stack"].weight_path) > 0))
        assert ev["area_px"] > 0.9 * valid, (ev["area_px"], valid)


def test_recall_at_snr_10(night):
    """At least 95 % of the injected sources with S/N >= 10 on the difference are candidates."""
    _, evals = night
    rows, snr, found = _static(evals)
    hi = snr >= 10
    n, k = int(hi.sum()), int(found[hi].sum())
    assert n >= 30
    missed = [(r["id"], r["kind"], round(r["snr"], 1), r["detected"]) for r, h, f in zip(rows, hi, found, strict=True)
              if h and not f]
    assert k >= binom.ppf(ALPHA, n, 0.95), (k, n, missed)


def test_recall_at_snr_5(night):
    """At least half of the injected sources with 5 <= S/N < 10 are candidates."""
    _, evals = night
    _, snr, found = _static(evals)
    mid = (snr >= 5) & (snr < 10)
    n, k = int(mid.sum()), int(found[mid].sum())
    assert n >= 10
    assert k >= binom.ppf(ALPHA, n, 0.5), (k, n)


def test_false_candidates(night):
    """At most 5 false candidates per full-size stack, scaled to the unmasked area of these
    differences (candidates farther than 1.5 FWHM from every injected source)."""
    _, evals = night
    nfalse = sum(len(ev["false"]) for ev in evals)
    area = sum(ev["area_px"] for ev in evals)
    lam = FALSE_PER_FULL_STACK * area / FULL_AREA_PX
    details = [(round(float(f["X_IMAGE"])), round(float(f["Y_IMAGE"])), int(f["sign"]), round(float(f["snr_psf"]), 1))
               for ev in evals for f in ev["false"]]
    assert nfalse <= poisson.ppf(1 - ALPHA, lam), (nfalse, lam, details)


def test_fading_and_moving_found_and_labelled(night):
    runs, evals = night
    fading = [r for ev in evals for r in ev["rows"] if r["kind"] == "fading" and r["snr"] >= 10]
    assert len(fading) >= 2
    assert all(r["found"] and r["label"] == "fading" for r in fading), fading
    moving = [(r, ev) for ev in evals for r in ev["rows"] if r["kind"] == "moving" and r["snr"] >= 10]
    assert len(moving) >= 2
    assert all(r["found"] for r, _ in moving), [r for r, _ in moving]
    labelled = [(r, ev) for r, ev in moving if r["label"] == "moving"]
    assert labelled, [r for r, _ in moving]
    for r, ev in labelled:               # the simulator's object moves at 45"/h
        rate = float(ev["cat"]["rate_arcsec_h"][r["row"]])
        assert abs(rate / 45.0 - 1) < 0.25, rate


def test_snr_of_the_search_follows_the_truth(night):
    """The statistical S/N the search quotes for the injected sources it finds agrees with the
    S/N computed from their true flux and the difference's noise (the comparison's own
    yardstick), to the scatter of a measurement."""
    _, evals = night
    ratio = []
    for ev in evals:
        for r in ev["rows"]:
            if r["kind"] == "static" and r["found"] and 10 <= r["snr"] < 200:
                ratio.append(float(ev["cat"]["snr_stat"][r["row"]]) / r["snr"])
    assert len(ratio) >= 15
    assert 0.8 < np.median(ratio) < 1.2, np.median(ratio)


def test_stars_that_moved_since_the_reference_epoch_were_moved(night):
    """The subtract stage moved the catalogue stars in each reference from the reference's
    epoch (the simulator's truth: 2013.0 for the PS1-like one) to the science's; with a decade
    between them the fastest stars moved by pixels, with weeks only a few moved, by a little."""
    import json

    from astropy.io import fits
    from astropy.time import Time

    runs, _ = night
    seen = set()
    for e in runs:
        ev = e["event"]
        h = fits.getheader(ev.path)
        ref = Path(ev.reference_path)        # <root>/factory/ref_frame/<filter>/<ref>.fits
        truth = json.loads((ref.parents[3] / "truth" / "refs" / f"{ref.name[:-5]}.json").read_text())
        epoch = truth["epoch"]
        assert h["SUBPMEPO"] == pytest.approx(epoch, abs=0.01), (ref.name, h["SUBPMEPO"], epoch)
        years = Time(h["DATE-OBS"], scale="utc").jyear - epoch
        if years > 5:
            assert h["SUBPMSTR"] >= 10 and h["SUBPMSHF"] > 1.0, (ref.name, h["SUBPMSTR"], h["SUBPMSHF"])
        else:
            assert h["SUBPMSHF"] < 1.0, (ref.name, h["SUBPMSHF"])
        seen.add(years > 5)
    assert seen == {True, False}
