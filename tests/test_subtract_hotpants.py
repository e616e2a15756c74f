"""The HOTPANTS engine's command line, derived per image as v1-behaviour.md §8.4 describes.

The binary is in no package reachable here, so what is tested is the argument list built
from real headers (and the stamp file): every v1 option with its value, the B10 fix, and the
extra options that make its products match the native engine's. Engine selection falls back
to the native engine when the binary is absent.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits

from gppy.config import Settings
from gppy_subtract.hotpants import lower_threshold, stamp_file_text, v1_arguments
from gppy_subtract.service import SubtractService


def opts(args: list[str]) -> dict[str, str]:
    out = {}
    i = 0
    while i < len(args):
        assert args[i].startswith("-"), args[i]
        out[args[i]] = args[i + 1]
        i += 2
    return out


FILES = {"sci": "/d/sci.com.fits", "ref": "/r/ref.fits", "diff": "/d/t/sci.com.subt.fits", "conv": "/d/t/conv.fits",
         "noise": "/d/t/noise.fits", "omask": "/d/t/omask.fits", "sci_mask": "/d/sci.mask.fits",
         "ref_mask": "/r/ref.mask.fits", "sci_noise": "/tmp/sn.fits", "ref_noise": "/tmp/rn.fits",
         "stamps": "/d/sci.com.ssf.txt"}


def test_v1_command_line():
    sci = fits.Header({"SKYVAL": 0.12, "SKYSIG": 0.105, "EGAIN": 4.2})
    ref = fits.Header({"EGAIN": 30.0})
    o = opts(v1_arguments(sci, ref, FILES))
    assert o["-c"] == "t" and o["-n"] == "i"
    assert float(o["-iu"]) == 60000.0                      # no SATURATE: v1's fixed value
    assert float(o["-il"]) == pytest.approx(0.12 - 5 * 0.105)
    assert float(o["-tu"]) == 6e7 and float(o["-tl"]) == -6e7
    assert (o["-nrx"], o["-nry"]) == ("3", "2") and o["-v"] == "0"
    assert o["-inim"] == FILES["sci"] and o["-tmplim"] == FILES["ref"] and o["-outim"] == FILES["diff"]
    assert o["-oci"] == FILES["conv"] and o["-imi"] == FILES["sci_mask"] and o["-tmi"] == FILES["ref_mask"]
    assert o["-ssf"] == FILES["stamps"]
    # added for our products: noise in and out, output mask, gains
    assert o["-ini"] == FILES["sci_noise"] and o["-tni"] == FILES["ref_noise"]
    assert o["-oni"] == FILES["noise"] and o["-omi"] == FILES["omask"]
    assert float(o["-ig"]) == 4.2 and float(o["-tg"]) == 30.0


def test_saturation_in_the_stack_units_and_forced_direction():
    # B10: a stack in ADU/s saturates far below 60000; the header's SATURATE is used
    sci = fits.Header({"SKYVAL": 0.0, "SKYSIG": 1.0, "SATURATE": 211.5})
    ref = fits.Header({"SATURATE": 51000.0})
    o = opts(v1_arguments(sci, ref, {k: FILES[k] for k in ("sci", "ref", "diff")}, nregions=(6, 4),
                          convolve="science"))
    assert float(o["-iu"]) == 211.5 and float(o["-tu"]) == 51000.0
    assert o["-c"] == "i" and (o["-nrx"], o["-nry"]) == ("6", "4")
    assert "-ssf" not in o and "-ig" not in o


def test_lower_threshold_without_header_keys():
    rng = np.random.default_rng(0)
    data = rng.normal(10.0, 2.0, (400, 400))
    assert lower_threshold(fits.Header(), data) == pytest.approx(10.0 - 5 * 2.0, abs=0.3)
    assert lower_threshold(fits.Header({"SKYVAL": 3.0, "SKYSIG": 0.5})) == pytest.approx(0.5)


def test_stamp_file_is_one_based():
    assert stamp_file_text(np.array([0, 99]), np.array([9, 19])) == "1.00 10.00\n100.00 20.00\n"


def test_engine_choice(data_root):
    svc = SubtractService(Settings(config=data_root, subtract_engine="hotpants", log_json=False))
    expected = "hotpants" if shutil.which("hotpants") else "native"
    assert svc._engine() == expected
    assert SubtractService(Settings(config=data_root, subtract_engine="native", log_json=False))._engine() == "native"
