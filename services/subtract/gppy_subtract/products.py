"""Headers of the subtraction products.

The difference image carries the science header (v1: HOTPANTS copied it, so ``SEEING``,
``ZP_*``, ``UL5_*``, ``SKYSIG``, ``EGAIN`` ... apply to it: the difference is on the science
photometric scale), plus quality keys of the subtraction. The noise, mask and convolved
images carry the science WCS and the same quality keys. Nothing time-dependent is written,
so a re-run produces identical headers.

Quality keys:

========  ==============================================================
SUBENGIN  engine (native or hotpants)
SUBCONV   image that was convolved (REFERENCE or SCIENCE)
PHOTNORM  'i': normalised to the science image (HOTPANTS' key)
SUBREF    reference file name
SUBKSIZE  kernel size 2r+1 (px); SUBKHW its half-width
SUBKORD   spatial order of the kernel (highest over regions)
SUBBGORD  spatial order of the differential background
SUBBASIS  Gaussian widths (px) / polynomial degrees of the kernel basis
SUBNREG   number of regions (v1 -nrx x -nry)
SUBNSTAR  stars detected in both images
SUBNSTMP  stamps kept (all regions); SUBNSREJ stamps rejected
SUBCHI2   mean reduced chi^2 of the kept stamps
SUBRNR    residual noise ratio: robust std of difference / noise
SUBKSUM   kernel sum (median over regions) = flux ratio target / convolved
SUBFWHMS  median stamp FWHM of the science (px); SUBFWHMR of the reference
SUBFALLB  regions that used the whole-image kernel (too few stamps)
KSUMnn    kernel sum of region nn; CONVOLnn TEMPLATE or IMAGE (HOTPANTS' keys)
REGIONnn  region nn, IRAF section [x0:x1,y0:y1] (1-based)
========  ==============================================================
"""

from __future__ import annotations

from astropy.io import fits

from gppy.masks import describe as mask_bits

STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO", "BSCALE",
              "CHECKSUM", "DATASUM", "PCOUNT", "GCOUNT", "XTENSION", "BLANK"}
WCS_PREFIXES = ("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "PC1_", "PC2_", "CDELT", "CUNIT", "PV1_", "PV2_",
                "RADESYS", "EQUINOX", "LONPOLE", "LATPOLE", "WCSAXES", "A_", "B_", "AP_", "BP_", "MJDREF",
                "DATE-OBS", "MJD-OBS")


def science_keys(header: fits.Header) -> fits.Header:
    """The science header without the keys describing the data unit."""
    out = fits.Header()
    for card in header.cards:
        if card.keyword in STRUCTURAL or card.keyword == "":
            continue
        out.append(card, end=True)
    return out


def wcs_keys(header: fits.Header) -> fits.Header:
    """Only the WCS (and observation time) cards of ``header``."""
    out = fits.Header()
    for card in header.cards:
        if card.keyword.startswith(WCS_PREFIXES):
            out.append(card, end=True)
    return out


def quality_cards(summary: dict) -> list[tuple[str, object, str]]:
    """Header cards from a subtraction summary (see :func:`summary_of`)."""
    cards: list[tuple[str, object, str]] = [
        ("SUBENGIN", summary["engine"], "subtraction engine"),
        ("SUBCONV", summary["convolved"].upper(), "image convolved to match the other"),
        ("PHOTNORM", "i", "difference normalised to the science image"),
        ("SUBREF", summary["reference"][:68], "reference image"),
    ]
    if summary.get("half_width") is not None:
        hw = int(summary["half_width"])
        cards += [("SUBKSIZE", 2 * hw + 1, "[px] kernel size"), ("SUBKHW", hw, "[px] kernel half-width")]
    for key, name, comment, fmt in (
            ("SUBKORD", "kernel_order", "spatial order of the kernel", int),
            ("SUBBGORD", "bg_order", "spatial order of the differential background", int),
            ("SUBBASIS", "basis", "kernel basis: Gaussian sigma [px]/degree", str),
            ("SUBNREG", "nregions", "regions with their own kernel", int),
            ("SUBNSTAR", "n_stars", "stars found in both images", int),
            ("SUBNSTMP", "n_kept", "stamps kept in the kernel fits", int),
            ("SUBNSREJ", "n_rejected", "stamps rejected", int),
            ("SUBCHI2", "chi2", "mean reduced chi2 of the kept stamps", float),
            ("SUBRNR", "noise_ratio", "robust std of difference/noise", float),
            ("SUBKSUM", "kernel_sum", "kernel sum (median over regions)", float),
            ("SUBFWHMS", "fwhm_science", "[px] median stamp FWHM, science", float),
            ("SUBFWHMR", "fwhm_reference", "[px] median stamp FWHM, reference", float),
            ("SUBFALLB", "n_fallback", "regions using the whole-image kernel", int),
            ("SUBPMSTR", "pm_moved", "catalogue stars moved to the science epoch", int),
            ("SUBPMSHF", "pm_max_shift", "[px] largest such shift", float),
            ("SUBPMEPO", "pm_ref_epoch", "[yr] reference epoch the stars moved from", float)):
        value = summary.get(name)
        if value is None:
            continue
        if fmt is float:
            value = round(float(value), 5) if value == value else "NaN"
        else:
            value = fmt(value)
        cards.append((key, value, comment))
    for i, reg in enumerate(summary.get("regions", [])):
        if i > 99:
            break
        y0, y1, x0, x1 = reg["bounds"]
        cards.append((f"REGION{i:02d}", f"[{x0 + 1}:{x1},{y0 + 1}:{y1}]", "region (IRAF section)"))
        cards.append((f"CONVOL{i:02d}", "TEMPLATE" if summary["convolved"] == "reference" else "IMAGE",
                      "image convolved in the region"))
        cards.append((f"KSUM{i:02d}", round(float(reg["kernel_sum"]), 6), "kernel sum in the region"))
    return cards


def summary_of(res, reference_name: str, engine: str = "native") -> dict:
    """Plain-data summary of a :class:`gppy_subtract.engine.SubtractionResult`."""
    regions = []
    for reg in res.regions:
        regions.append({"bounds": reg.bounds, "kernel_sum": reg.solution.flux, "n_stamps": reg.n_stamps,
                        "n_kept": reg.fit.n_kept, "chi2": reg.fit.mean_chi2, "fallback": reg.fallback,
                        "kernel_order": reg.solution.order})
    basis = ",".join(f"{s:.2f}/{d}" for s, d in zip(res.spec.sigmas, res.spec.degrees, strict=True))
    own = [r for r in res.regions if not r.fallback]
    return {
        "engine": engine, "convolved": res.convolved, "reference": reference_name,
        "half_width": res.spec.half_width, "basis": basis,
        "kernel_order": max(r.solution.order for r in res.regions),
        "bg_order": max(max(a + b for a, b in r.solution.bg_terms) for r in res.regions),
        "nregions": len(res.regions), "n_stars": res.n_stars,
        "n_kept": sum(r.fit.n_kept for r in own), "n_rejected": sum(r.n_stamps - r.fit.n_kept for r in own),
        "chi2": res.mean_chi2, "noise_ratio": res.noise_ratio, "kernel_sum": res.kernel_sum,
        "fwhm_science": res.fwhm_science, "fwhm_reference": res.fwhm_reference,
        "n_fallback": sum(1 for r in res.regions if r.fallback), "regions": regions,
    }


def set_card(header: fits.Header, key: str, value, comment: str = "") -> None:
    """``header[key] = (value, comment)`` with the comment shortened to fit one 80-char card."""
    bare = max(len(fits.Card(key, value).image.rstrip()), 30)   # fixed format: comment after col 30
    room = 80 - bare - 3
    header[key] = (value, comment[:room] if room > 0 else "")


def _with_cards(header: fits.Header, cards) -> fits.Header:
    for key, value, comment in cards:
        set_card(header, key, value, comment)
    return header


def difference_header(sci_header: fits.Header, summary: dict) -> fits.Header:
    """Science keys + quality keys; BUNIT kept (the difference is in science units)."""
    h = science_keys(sci_header)
    set_card(h, "IMAGETYP", "DIFFERENCE", "PSF-matched science minus reference")
    return _with_cards(h, quality_cards(summary))


def noise_header(sci_header: fits.Header, summary: dict) -> fits.Header:
    h = wcs_keys(sci_header)
    if "BUNIT" in sci_header:
        h["BUNIT"] = sci_header["BUNIT"]
    set_card(h, "IMAGETYP", "NOISE", "1-sigma noise of the difference; 0 where masked")
    return _with_cards(h, quality_cards(summary))


def mask_header(sci_header: fits.Header, summary: dict) -> fits.Header:
    h = wcs_keys(sci_header)
    set_card(h, "IMAGETYP", "MASK", "bit mask of the difference (non-zero = bad)")
    for name, value in mask_bits().items():
        set_card(h, f"MASKB_{name}"[:8], value, f"mask bit {name}")
    return _with_cards(h, quality_cards(summary))


def convolved_header(sci_header: fits.Header, ref_header: fits.Header, summary: dict) -> fits.Header:
    """The convolved image: science WCS; photometric keys of the image it was matched to."""
    h = wcs_keys(sci_header)
    src = sci_header if summary["convolved"] == "reference" else ref_header
    for key in ("BUNIT", "OBJECT", "FILTER", "EGAIN"):
        if key in src:
            h[key] = src[key]
    set_card(h, "IMAGETYP", "CONVOLVED", f"{summary['convolved']} convolved with the matching kernel")
    return _with_cards(h, quality_cards(summary))
