"""Small simulated nights: determinism, the master archive of --no-calib, physics switches and
the command line."""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time, TimeDelta

from gppy import naming
from gppy.sim import Physics, simulate
from gppy.sim.cli import register

from .conftest_sim import load_night

SMALL = {"size": (384, 256), "targets": 2, "filters": ["g", "m500"], "n_transients": 3}


def _digest(root) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = simulate(tmp_path / "a", seed=5, **SMALL).parent
    b = simulate(tmp_path / "b", seed=5, workers=2, **SMALL).parent     # two processes, same bytes
    c = simulate(tmp_path / "c", seed=6, **SMALL).parent
    da, db, dc = _digest(a), _digest(b), _digest(c)
    # path.json and night.json name their own folder; everything else is byte-identical
    differ = [k for k in da if da[k] != db.get(k)]
    assert set(differ) <= {"path.json", "truth/night.json"}
    assert set(da) == set(db)
    ja, jb = json.loads((a / "truth" / "night.json").read_text()), json.loads((b / "truth" / "night.json").read_text())
    ja.pop("night_dir"), jb.pop("night_dir")
    ja.pop("master_archive"), jb.pop("master_archive")
    assert ja == jb
    raws_a = sorted((a / "obsdata").rglob("*.fits"))
    raws_c = sorted((c / "obsdata").rglob("*.fits"))
    assert len(raws_a) > 20 and len(raws_c) > 0
    assert not np.array_equal(fits.getdata(raws_a[-1]), fits.getdata(raws_c[-1]))
    same = [k for k in da if k.startswith("obsdata") and dc.get(k) == da[k]]
    assert not same


def test_no_calib_night_comes_with_a_master_archive(tmp_path):
    path = simulate(tmp_path, seed=3, calib=False, **SMALL)
    night = load_night(path.parent)
    kinds = {f["kind"] for f in night.truth["frames"]}
    assert kinds == {"science"}
    for p in night.night_dir.glob("*.fits"):
        assert fits.getheader(p)["IMAGETYP"] in ("Light Frame", "LIGHT", "Light")
    mframe = tmp_path / "factory" / "master_frame_1x1_gain2750"
    archived = [tmp_path / p for p in night.truth["master_archive"]]
    assert archived and all(p.exists() for p in archived)
    nights = [Time(f"{night.truth['night']}T12:00:00") - TimeDelta(k, format="jd") for k in (3, 9)]
    true_bias = night.calib_truth("bias")
    true_dark = night.calib_truth("dark_current")
    for t in nights:
        ymd = t.strftime("%Y%m%d")
        zero = naming.master_zero(mframe, "7DT01", ymd)
        assert zero in archived
        z = fits.getdata(zero)
        assert z.shape == (256, 384) and abs(np.median(z - true_bias)) < 2.0
        for e in (100, 300):
            dark = naming.master_dark(mframe, "7DT01", e, ymd)
            assert dark in archived
            d = fits.getdata(dark)
            hot = true_dark > 1.0
            assert np.median(d[hot] / (true_dark[hot] * e / 0.256)) == pytest.approx(1.0, rel=0.05)
        for f in SMALL["filters"]:
            flat = naming.master_flat(mframe, "7DT01", f, ymd)
            assert flat in archived
            fl = fits.getdata(flat)
            assert abs(np.median(fl) - 1) < 1e-3
            assert np.std(fl / night.calib_truth(f"flat_{f}")) < 0.01




def test_physics_switches_give_a_clean_frame(tmp_path):
    ph = Physics.none()
    ph.stars = True
    path = simulate(tmp_path, seed=1, physics=ph, references=False, transients=False, **SMALL)
    night = load_night(path.parent)
    name = night.frames("science")[0]
    raw, _ = night.raw(name)
    t = night.frame_truth(name)
    assert t["n_cosmic_rays"] == 0 and t["trail"] is None
    assert np.all(night.mask(name) == 0)
    # no noise, no sky, a flat bias: the frame is the bias plus the stars, to rounding
    stars = night.stars(name)
    total = raw.sum() - 500.0 * raw.size
    inside = stars["flux_adu"][(stars["x_0based"] > 40) & (stars["x_0based"] < 343)
                               & (stars["y_0based"] > 40) & (stars["y_0based"] < 215)].sum()
    assert inside <= total <= stars["flux_adu"].sum() * 1.01 + 0.5 * raw.size
    assert abs(np.median(raw) - 500.0) <= 1
    # no distortion, rotation or pointing error: the header pointing is the truth
    assert t["rotation_deg"] == 0.0
    assert np.allclose(t["pointing_offset_arcsec"], 0.0, atol=1e-6)


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="gppy")
    sub = parser.add_subparsers(dest="cmd")
    register(sub)
    args = parser.parse_args(["simulate", str(tmp_path / "n"), "--unit", "7DT07", "--night", "2024-11-10",
                              "--size", "320x200", "--targets", "1", "--filters", "m875", "--seed", "2",
                              "--no-calib", "--quiet"])
    assert args.size == (320, 200) and not args.full
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "path.json" in out
    cfg = json.loads((tmp_path / "n" / "path.json").read_text())
    night_dir = tmp_path / "n" / "obsdata" / "7DT07" / "2024-11-10_gain2750"
    files = sorted(night_dir.glob("*.fits"))
    assert files and all(p.name.startswith("7DT07_") and "_m875_1x1_" in p.name for p in files)
    assert cfg["settings"]["units"] == ["7DT07"]
    full = parser.parse_args(["simulate", str(tmp_path / "f"), "--full"])
    assert full.full
