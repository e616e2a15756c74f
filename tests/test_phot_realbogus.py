"""The stored real/bogus model on an independent synthetic set (another seed than training)."""

from __future__ import annotations

import numpy as np

from gppy_phot import rb_train, realbogus


def test_model_separates_real_sources_from_artefacts(tmp_path):
    x, kind, snr, sign = rb_train.measure(np.random.default_rng(12345), tmp_path)
    rb = realbogus.score(x)
    real = (kind == 0) & (sign > 0)
    bright = real & (np.abs(snr) >= 10)
    faint = real & (np.abs(snr) >= 5) & (np.abs(snr) < 10)
    assert bright.sum() > 100 and faint.sum() > 50
    assert (rb[bright] >= 0.5).mean() > 0.97
    assert (rb[faint] >= 0.5).mean() > 0.8
    for k in range(1, len(rb_train.KINDS)):
        sel = kind == k
        assert sel.sum() > 10
        assert (rb[sel] < 0.5).mean() > 0.85, rb_train.KINDS[k]
    model = realbogus.load_model()
    assert model["features"] == list(realbogus.FEATURES)
