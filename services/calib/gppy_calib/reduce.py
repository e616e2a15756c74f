"""Science-frame reduction and its noise model (v1-behaviour.md §4.6, bug B5 fixed).

``reduced = (raw - bias - dark * s) / flat`` with ``s = t_science / t_dark`` (the dark of the
nearest exposure time, scaled), in float32 ADU.

Noise model (variance of a reduced pixel, reduced ADU^2), built from the background rather
than the pixel itself so that weights do not depend on the sources (what SExtractor's
``MAP_WEIGHT`` and SWarp expect):

``var = ((sky * flat + dark * s) / g + rn**2 + err_bias**2 + (s * err_dark)**2) / flat**2
+ (sky * err_flat / flat)**2``

with ``g`` the raw gain (EGAIN, e-/ADU), ``rn`` the read noise (raw ADU), ``sky`` the median
sky of the reduced frame (reduced ADU) and the ``err_*`` the masters' 1-sigma error images.
The masters' errors are treated as independent (slightly conservative when the dark was
built with the same bias).

All functions take an array module ``xp`` (NumPy or CuPy) and use only what both provide.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

#: Sub-sampling step for sky and flat medians (every 4th pixel in each axis).
STAT_STEP = 4


def dark_scale(exptime: float, dark_exptime: float) -> float:
    """Scale factor of a master dark for a frame of ``exptime`` s: ``exptime / dark_exptime``."""
    if dark_exptime <= 0:
        raise ValueError(f"master dark exposure time {dark_exptime} s is not positive")
    return float(exptime) / float(dark_exptime)


def reduce_frame(raw, bias, dark, scale: float, flat, xp: ModuleType):
    """``(raw - bias - dark * scale) / flat`` as float32.

    Parameters
    ----------
    raw : array
        Raw frame, ADU.
    bias : array
        Master bias, ADU.
    dark : array
        Master dark, ADU in its own exposure time (bias removed).
    scale : float
        ``t_science / t_dark``.
    flat : array
        Master flat, relative response.
    xp : module
        NumPy or CuPy; the inputs are moved to it.

    Returns
    -------
    array
        Reduced frame on ``xp``, float32 ADU (non-finite where the flat is zero or NaN).
    """
    f32 = xp.float32
    out = xp.asarray(raw, dtype=f32) - xp.asarray(bias, dtype=f32)
    out -= xp.asarray(dark, dtype=f32) * f32(scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        out /= xp.asarray(flat, dtype=f32)
    return out


def subgrid_median(image, good, xp: ModuleType, step: int = STAT_STEP) -> float:
    """Median of ``image`` over the pixels where ``good`` is true, every ``step``-th pixel.

    Returns NaN when no pixel qualifies.
    """
    sub = image[::step, ::step]
    ok = good[::step, ::step] & xp.isfinite(sub)
    vals = sub[ok]
    if int(vals.size) == 0:
        return float("nan")
    return float(xp.median(vals))


def variance_terms(flat, dark, bias_err, dark_err, flat_err, scale: float, gain: float, rdnoise_adu: float,
                   xp: ModuleType):
    """The frame-independent parts of the variance: ``var = a + sky * b + sky**2 * c``.

    ``a = (dark * s / g + rn**2 + err_bias**2 + (s * err_dark)**2) / flat**2``,
    ``b = 1 / (g * flat)``, ``c = (err_flat / flat)**2`` (reduced ADU^2, ADU, 1). Non-finite
    master errors count as 0. See :func:`variance_map` for the arguments.
    """
    f32 = xp.float32
    flat = xp.asarray(flat, dtype=f32)
    s = f32(scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_f = f32(1) / flat
        a = xp.maximum(xp.asarray(dark, dtype=f32) * s, f32(0)) * f32(1.0 / gain) + f32(rdnoise_adu ** 2)
        a += xp.nan_to_num(xp.asarray(bias_err, dtype=f32)) ** 2
        a += (s * xp.nan_to_num(xp.asarray(dark_err, dtype=f32))) ** 2
        a *= inv_f * inv_f
        b = inv_f * f32(1.0 / gain)
        c = (xp.nan_to_num(xp.asarray(flat_err, dtype=f32)) * inv_f) ** 2
    return a, b, c


def variance_from_terms(terms, sky: float, xp: ModuleType):
    """``a + sky * (b + sky * c)`` with ``sky`` clipped at 0 (reduced ADU^2)."""
    a, b, c = terms
    sky = xp.float32(max(float(sky), 0.0))
    return a + sky * (b + sky * c)


def variance_map(flat, dark, bias_err, dark_err, flat_err, scale: float, sky: float, gain: float,
                 rdnoise_adu: float, xp: ModuleType):
    """Background variance of the reduced frame, reduced ADU^2 (formula in the module docstring).

    Parameters
    ----------
    flat, dark : array
        Master flat (relative) and master dark (ADU in its exposure time).
    bias_err, dark_err, flat_err : array
        1-sigma error images of the masters (same units as the masters).
    scale : float
        Dark scale factor ``t_science / t_dark``.
    sky : float
        Median sky of the reduced frame, reduced ADU (clipped at 0).
    gain : float
        Raw gain, e-/ADU.
    rdnoise_adu : float
        Read noise, raw ADU.
    """
    terms = variance_terms(flat, dark, bias_err, dark_err, flat_err, scale, gain, rdnoise_adu, xp)
    return variance_from_terms(terms, sky, xp)


def effective_gain(gain: float, flat, good, xp: ModuleType) -> float:
    """e-/ADU of the reduced frame: ``gain * median(flat)`` over good pixels.

    A reduced pixel is ``raw / flat``, so one reduced ADU holds ``gain * flat`` electrons; the
    header value is that at the median flat (the weight map carries the per-pixel truth).
    """
    med = subgrid_median(xp.asarray(flat), good, xp)
    return float(gain * med)


def reduced_saturation(saturate_raw: float, bias, dark, scale: float, flat, good, xp: ModuleType) -> float:
    """Conservative saturation level of the reduced frame, reduced ADU.

    The lowest reduced value that a pixel at the raw level ``saturate_raw`` can have over the
    good pixels: ``min((saturate_raw - bias - dark * scale) / flat)``. Any pixel at or above
    it may be saturated.
    """
    f32 = xp.float32
    level = (f32(saturate_raw) - xp.asarray(bias, dtype=f32) - xp.asarray(dark, dtype=f32) * f32(scale))
    with np.errstate(divide="ignore", invalid="ignore"):
        level /= xp.asarray(flat, dtype=f32)
    ok = good & xp.isfinite(level)
    if not bool(ok.any()):
        return float(saturate_raw)
    return float(level[ok].min())
