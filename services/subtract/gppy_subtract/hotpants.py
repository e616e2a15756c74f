"""The optional HOTPANTS engine: v1's command line (v1-behaviour.md §8.4), same products.

Used only when ``subtract_engine`` is ``hotpants`` or ``auto`` *and* a ``hotpants`` binary is
on PATH (it is in no Debian or PyPI package). v1 called

    hotpants -c t -n i -iu 60000 -il <SKYVAL - 5 SKYSIG> -tu 60000000 -tl -60000000
             -inim <sci> -tmplim <ref> -outim <diff> -oci <conv> -imi <sci mask> -tmi <ref mask>
             -v 0 -nrx 3 -nry 2 -ssf <stamps>

Kept: ``-n i`` (science photometric scale), ``-c t`` (``-c i`` when ``subtract_convolve`` is
``science``), ``-il`` from SKYVAL/SKYSIG of the science header, ``-nrx/-nry`` from
``subtract_nregions``, template limits of +-6e7, masks, stamp centres (here: the native
engine's star selection, v1 used catalogue matches). Fixed: ``-iu`` is the science SATURATE in
the stack's own units when the header has it (v1 bug B10 made 60000 meaningless for stacks in
ADU/s). Added so that the products match the native engine's: input noise images ``-ini``/
``-tni`` (from the weight maps), gains ``-ig``/``-tg`` (EGAIN), output noise ``-oni`` and mask
``-omi``. The difference, noise and convolved images are then masked with the same union of
masks (grown by the kernel footprint) as the native engine's and written with the same keys.

Adding the binary to the subtract image (derive from it; the upstream source needs
``-fcommon`` with GCC >= 10, https://github.com/acbecker/hotpants/issues/5)::

    FROM gppy-subtract:latest AS build
    USER root
    RUN apt-get update && apt-get install -y --no-install-recommends build-essential \\
            libcfitsio-dev git ca-certificates \\
     && git clone https://github.com/acbecker/hotpants.git /tmp/hotpants \\
     && make -C /tmp/hotpants CFLAGS="-O3 -fcommon -funroll-loops -I/usr/include" \\
            LIBS="-lm -lcfitsio"
    FROM gppy-subtract:latest
    COPY --from=build /tmp/hotpants/hotpants /usr/local/bin/hotpants
    ENV GPPY_SUBTRACT_ENGINE=auto

(the Makefile variables are upstream's; check them against the checked-out version).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy import tools
from gppy.fitsio import read_image, write_fits
from gppy.masks import MaskBit

from . import stamps as st
from .convolve import dilate

#: HOTPANTS' default kernel half-width (-r), used to grow the masks as the native engine does
DEFAULT_HALF_WIDTH = 10
V1_TEMPLATE_LIMIT = 6.0e7
V1_IMAGE_UPPER = 60000.0


def lower_threshold(header: fits.Header, data: np.ndarray | None = None) -> float:
    """v1's ``-il``: ``SKYVAL - 5 * SKYSIG`` from the science header (robust from the data
    when the keys are missing)."""
    try:
        return float(header["SKYVAL"]) - 5.0 * float(header["SKYSIG"])
    except (KeyError, TypeError, ValueError):
        pass
    if data is None:
        return -1e30
    sub = data[::5, ::5]
    sub = sub[np.isfinite(sub) & (sub != 0)]
    if sub.size == 0:
        return -1e30
    med = float(np.median(sub))
    return med - 5.0 * 1.4826 * float(np.median(np.abs(sub - med)))


def v1_arguments(sci_header: fits.Header, ref_header: fits.Header, files: dict[str, Path],
                 nregions: tuple[int, int] = (3, 2), convolve: str = "reference",
                 il: float | None = None) -> list[str]:
    """HOTPANTS argument list (v1 §8.4 plus the noise/mask/gain options, see the module text).

    Parameters
    ----------
    sci_header, ref_header : Header
        Headers of the science image and of the reference on the science grid.
    files : dict
        Paths: ``sci``, ``ref``, ``diff``, ``conv``, ``noise``, ``omask``, ``sci_mask``,
        ``ref_mask``, ``sci_noise``, ``ref_noise``, ``stamps`` (any may be absent except
        ``sci``, ``ref``, ``diff``).
    nregions : (nx, ny)
        ``-nrx``, ``-nry``.
    convolve : 'reference' | 'science'
        ``-c t`` or ``-c i``.
    il : float, optional
        Lower valid level of the science; default :func:`lower_threshold` of its header.
    """
    sat = sci_header.get("SATURATE")
    iu = float(sat) if isinstance(sat, int | float) and sat > 0 else V1_IMAGE_UPPER
    rsat = ref_header.get("SATURATE")
    tu = float(rsat) if isinstance(rsat, int | float) and rsat > 0 else V1_TEMPLATE_LIMIT
    il = lower_threshold(sci_header) if il is None else il
    args = ["-inim", files["sci"], "-tmplim", files["ref"], "-outim", files["diff"],
            "-c", "t" if convolve != "science" else "i", "-n", "i",
            "-iu", f"{iu:.6g}", "-il", f"{il:.6g}", "-tu", f"{tu:.6g}", "-tl", f"{-V1_TEMPLATE_LIMIT:.6g}",
            "-nrx", str(int(nregions[0])), "-nry", str(int(nregions[1])), "-v", "0"]
    optional = (("-oci", "conv"), ("-oni", "noise"), ("-omi", "omask"), ("-imi", "sci_mask"),
                ("-tmi", "ref_mask"), ("-ini", "sci_noise"), ("-tni", "ref_noise"), ("-ssf", "stamps"))
    for flag, key in optional:
        if files.get(key):
            args += [flag, files[key]]
    for flag, header in (("-ig", sci_header), ("-tg", ref_header)):
        g = header.get("EGAIN")
        if isinstance(g, int | float) and g > 0:
            args += [flag, f"{float(g):.6g}"]
    return [str(a) for a in args]


def stamp_file_text(xs: np.ndarray, ys: np.ndarray) -> str:
    """``-ssf`` file: one ``x y`` per line, 1-based FITS pixel coordinates."""
    return "".join(f"{x + 1:.2f} {y + 1:.2f}\n" for x, y in zip(xs, ys, strict=True))


def _sigma(var: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(var, 0)).astype(np.float32)


def subtract_with_hotpants(sci, ref, tmp: Path, params) -> tuple[dict, str]:
    """Run HOTPANTS on two :class:`gppy_subtract.service.Inputs` on the same grid.

    Returns
    -------
    (dict, str)
        ``diff``, ``noise``, ``mask``, ``conv`` host arrays and ``header`` (HOTPANTS' output
        header), and which image was convolved.
    """
    convolve = "science" if params.convolve == "science" else "reference"
    files = {k: tmp / f"{k}.fits" for k in ("sci", "ref", "diff", "conv", "noise", "omask", "sci_mask",
                                            "ref_mask", "sci_noise", "ref_noise")}
    write_fits(files["sci"], np.where(sci.mask == 0, sci.data, 0).astype(np.float32), sci.header)
    write_fits(files["ref"], np.where(ref.mask == 0, ref.data, 0).astype(np.float32), ref.header)
    write_fits(files["sci_mask"], (sci.mask != 0).astype(np.int16))
    write_fits(files["ref_mask"], (ref.mask != 0).astype(np.int16))
    write_fits(files["sci_noise"], _sigma(sci.var))
    write_fits(files["ref_noise"], _sigma(ref.var))
    stars = st.find_stars(sci.data, sci.var, sci.mask, ref.data, ref.var, ref.mask, np,
                          saturate_sci=sci.saturate, saturate_ref=ref.saturate)
    if len(stars):
        fw = float(np.median(np.maximum(stars.fwhm_s, stars.fwhm_r)))
        ok = st.usable(stars, sci.mask, ref.mask, max(15, int(math.ceil(3 * fw))), DEFAULT_HALF_WIDTH,
                       sci.data.shape, np)
        files["stamps"] = tmp / "stamps.ssf"
        files["stamps"].write_text(stamp_file_text(stars.x[ok], stars.y[ok]))
    args = v1_arguments(sci.header, ref.header, {k: str(v) for k, v in files.items()}, params.nregions, convolve,
                        il=lower_threshold(sci.header, sci.data))
    tools.run_tool("hotpants", args, cwd=tmp, timeout=3600)
    diff, header = read_image(files["diff"])
    noise, _ = read_image(files["noise"])
    conv, _ = read_image(files["conv"])
    omask, _ = read_image(files["omask"], dtype=np.float64)
    conv_mask = ref.mask if convolve == "reference" else sci.mask
    out = sci.mask.copy()
    out |= np.where(ref.mask != 0, int(MaskBit.REFERENCE), 0).astype(np.uint16)
    grown = (dilate(conv_mask != 0, DEFAULT_HALF_WIDTH, np) | (omask != 0)) & (out == 0)
    out |= np.where(grown, int(MaskBit.GROWN), 0).astype(np.uint16)
    bad = (out != 0) | ~np.isfinite(diff) | ~(noise > 0)
    res = {"diff": np.where(bad, 0, diff).astype(np.float32), "noise": np.where(bad, 0, noise).astype(np.float32),
           "mask": out, "conv": np.where(bad, 0, conv).astype(np.float32), "header": header}
    return res, convolve


def summary(res: dict, reference_name: str, convolved: str) -> dict:
    """Quality summary for :func:`gppy_subtract.products.quality_cards` from HOTPANTS' header."""
    h = res["header"]
    diff, noise = res["diff"], res["noise"]
    good = noise > 0
    ratio = diff[good][::9] / noise[good][::9]
    rnr = 1.4826 * float(np.median(np.abs(ratio - np.median(ratio)))) if ratio.size > 100 else float("nan")
    regions = []
    for i in range(int(h.get("NREGION", 0) or 0)):
        sec = str(h.get(f"REGION{i:02d}", ""))
        try:
            xs, ys = sec.strip("[]").split(",")
            x0, x1 = (int(v) for v in xs.split(":"))
            y0, y1 = (int(v) for v in ys.split(":"))
            bounds = (y0 - 1, y1, x0 - 1, x1)
        except ValueError:
            bounds = (0, 0, 0, 0)
        regions.append({"bounds": bounds, "kernel_sum": float(h.get(f"KSUM{i:02d}", float("nan")))})
    ksums = [r["kernel_sum"] for r in regions if r["kernel_sum"] == r["kernel_sum"]]
    return {"engine": "hotpants", "convolved": convolved, "reference": reference_name,
            "half_width": DEFAULT_HALF_WIDTH, "nregions": len(regions) or None, "noise_ratio": rnr,
            "kernel_sum": float(np.median(ksums)) if ksums else None, "regions": regions}
