"""Configuration (v1 path.json keys and defaults) and product naming."""

from __future__ import annotations

import json

import pytest

from gppy import naming
from gppy.config import PathConfig, load_settings


def test_path_json_blank_values_take_v1_defaults(tmp_path):
    cfg = tmp_path / "path.json"
    cfg.write_text(json.dumps({"path_base": str(tmp_path / "factory"), "path_obsdata": "",
                               "path_refcat": "  ", "_comment": "blank = default", "tile": "T00001"}))
    p = PathConfig.load(cfg)
    base = tmp_path / "factory"
    assert p.path_obsdata == tmp_path / "obsdata"
    assert p.path_processed == tmp_path / "processed_1x1_gain2750"
    assert p.path_refcat == base / "ref_cat"
    assert p.path_ref_scamp == base / "ref_scamp"
    assert p.ref_frame == base / "ref_frame"
    assert p.path_mframe == base / "master_frame_1x1_gain2750"
    assert p.unit_log("7DT07") == base / "log" / "7dt07.log"


def test_path_json_requires_path_base(tmp_path):
    cfg = tmp_path / "path.json"
    cfg.write_text(json.dumps({"path_obsdata": "/x"}))
    with pytest.raises(ValueError, match="path_base"):
        PathConfig.load(cfg)


def test_settings_precedence_env_over_path_json(tmp_path, monkeypatch):
    cfg = tmp_path / "path.json"
    cfg.write_text(json.dumps({"path_base": str(tmp_path), "settings": {"visit_gap_s": 100, "clip_sigma": 2.5}}))
    monkeypatch.setenv("GPPY_VISIT_GAP_S", "200")
    s = load_settings(config=str(cfg))
    assert s.visit_gap_s == 200 and s.clip_sigma == 2.5


@pytest.mark.parametrize("value,expected", [
    ("T00138", "T00138"), ("../../etc", "etc"), ("a b;rm -rf", "a-b-rm--rf"), ("m650", "m650"),
    ("NGC 253/x", "NGC-253-x"), ("SDSSJ1430+2303", "SDSSJ1430+2303"), ("Ω'\"$(x)", "x-"),
])
def test_sanitize_header_values(value, expected):
    out = naming.sanitize(value)
    assert out == expected
    assert "/" not in out and ".." not in out and not out.startswith(".")


def test_v1_product_names():
    assert naming.calib_name("7DT01", "UDS", "2023-11-05T00:39:15.6", "m400", 60.0) == \
        "calib_7DT01_UDS_20231105_003915_m400_60.fits"
    assert naming.calib_name("7DT01", "UDS", "2023-11-05T00:39:15", "m400", 0.5).endswith("_m400_0.5.fits")
    assert naming.stack_name("7DT03", "T09614", "2024-04-23T02:07:57", "r", 360) == \
        "calib_7DT03_T09614_20240423_020757_r_360.com.fits"
    dirs = naming.ProductDirs.of("/p", "T09373", "7DT01", "r")
    conv = naming.convolved_reference_name("ref_PS1_T09373_00000000_000000_r_0.fits", "2024-04-23T03:28:04", dirs)
    assert conv.name == "ref_PS1_T09373_20240423_032804_r_0.conv.fits"
    assert str(conv.parent) == "/p/T09373/7DT01/r/transient"


def test_atomic_products_are_readable_by_the_group_and_others(tmp_path):
    import os
    import stat

    import numpy as np

    from gppy.fitsio import write_fits

    old = os.umask(0o022)
    try:
        p = write_fits(tmp_path / "x.fits", np.zeros((2, 2), np.float32))
    finally:
        os.umask(old)
    mode = stat.S_IMODE(p.stat().st_mode)
    assert mode & 0o044 == 0o044  # not mkstemp's 0600: other containers/hosts read products


def test_secret_from_file(tmp_path):
    from gppy.config import Settings

    f = tmp_path / "slack"
    f.write_text("not-a-real-token\n")
    assert Settings(slack_token_file=f).secret("slack_token") == "not-a-real-token"
