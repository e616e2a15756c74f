"""Photometric scaling of the inputs of a stack, and the stack's gain and saturation level.

Pixel units of every stack
--------------------------
A stack is in **ADU of its reference frame**: each input ``i`` is multiplied by

    f_i = 10 ** (0.4 * (ZP_ref - ZP_i))

where ``ZP_i`` is the input's zero point (``ZP_AUTO`` written by the phot stage, mag for one
ADU in that frame) and ``ZP_ref`` that of the reference frame, the first input in time. After
scaling, a star gives the same number of ADU in every input, so the stack's pixel values are
what the reference exposure would have recorded (sky removed), its zero point is ``ZP_ref``
(written as ``STKZP``), and its noise is that of a single frame divided by about sqrt(N).

The inverse-variance weights follow the scaling (``w'_i = w_i / f_i**2``, which SWarp does
itself for its ``FSCALE``) and the stack's weight map is ``sum_i w'_i`` in ADU^-2 of the
reference frame. The effective gain and the saturation level below are expressed in the same
units, so Source Extractor's Poisson term ``flux / EGAIN`` and its background term from the
weight map are both right.

When no input has a zero point (no reference catalogue for the field), the inputs are scaled
by exposure time instead (``f_i = t_ref / t_i``, assuming a constant transparency) and the
stack carries no ``STKZP``; inputs without a zero point are left out when others have one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

#: Zero-point keywords tried in order (phot stage, v1 §7.2 item 11): the Kron-aperture zero
#: point measures total flux, so it does not depend on the frame's seeing as the fixed or
#: seeing-scaled apertures do.
ZP_KEYS: tuple[str, ...] = ("ZP_AUTO",)


def zero_point(header: fits.Header, keys: Sequence[str] = ZP_KEYS) -> float | None:
    """The input's zero point (mag for 1 ADU), or None when absent, zero or not finite."""
    for key in keys:
        value = header.get(key)
        try:
            zp = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(zp) and zp > 0.0:
            return zp
    return None


@dataclass(frozen=True)
class ScalePlan:
    """How the inputs of one stack are put on one photometric scale.

    Attributes
    ----------
    used : list of int
        Indices (into the inputs given) of the inputs that take part, in input order.
    factors : list of float
        Multiplicative flux factor of each used input (dimensionless).
    zp : float or None
        Zero point of the stack's pixels (mag for 1 unit), None when scaled by exposure time.
    method : str
        ``"zp"`` or ``"exptime"``.
    reference : int
        Index of the reference input.
    excluded : dict
        Index -> reason, for inputs left out.
    """

    used: list[int]
    factors: list[float]
    zp: float | None
    method: str
    reference: int
    excluded: dict[int, str] = field(default_factory=dict)


def plan_scaling(zps: Sequence[float | None], exptimes: Sequence[float],
                 reference: int = 0) -> ScalePlan:
    """Choose the flux factors that bring the inputs to the reference input's scale.

    Parameters
    ----------
    zps : sequence of float or None
        Zero point of each input (mag for 1 ADU), None if unknown.
    exptimes : sequence of float
        Exposure time of each input (s).
    reference : int
        Preferred reference input (the first in time); if it has no zero point while others
        have, the first input with one is used.

    Returns
    -------
    ScalePlan

    Raises
    ------
    ValueError
        If there are no inputs, or the lengths differ, or an exposure time is not positive
        where exposure-time scaling is needed.
    """
    n = len(zps)
    if n == 0 or n != len(exptimes):
        raise ValueError(f"need one zero point and one exposure time per input ({n}, {len(exptimes)})")
    with_zp = [i for i in range(n) if zps[i] is not None]
    if with_zp:
        ref = reference if zps[reference] is not None else with_zp[0]
        zp_ref = float(zps[ref])  # type: ignore[arg-type]
        factors = [10.0 ** (0.4 * (zp_ref - float(zps[i]))) for i in with_zp]  # type: ignore[arg-type]
        excluded = {i: "no zero point (ZP_AUTO) in its header" for i in range(n) if zps[i] is None}
        return ScalePlan(with_zp, factors, zp_ref, "zp", ref, excluded)
    bad = [i for i in range(n) if not float(exptimes[i]) > 0.0]
    if bad:
        raise ValueError(f"inputs {bad} have no zero point and no positive EXPTIME")
    t_ref = float(exptimes[reference])
    return ScalePlan(list(range(n)), [t_ref / float(t) for t in exptimes], None, "exptime", reference, {})


def effective_gain(gains: Sequence[float], factors: Sequence[float], weights: Sequence[float]) -> float:
    """Gain of an inverse-variance weighted mean of scaled inputs (e-/unit of the stack).

    Input ``i`` (gain ``g_i`` e-/ADU, flux factor ``f_i``, typical weight ``w_i`` in ADU^-2)
    enters the mean with weight ``w'_i = w_i / f_i**2``. A source of ``S`` stack units has
    ``S / f_i`` ADU, hence a Poisson variance ``f_i * S / g_i`` in stack units, in input ``i``;
    in the mean this gives ``S * sum(w'_i**2 f_i / g_i) / (sum w'_i)**2``, so

        EGAIN = (sum_i w'_i)**2 / sum_i (w'_i**2 * f_i / g_i).

    For N equal inputs this is ``N * g``.

    Parameters
    ----------
    gains : sequence of float
        e-/ADU of each input (``EGAIN``).
    factors : sequence of float
        Flux factor of each input.
    weights : sequence of float
        Typical inverse variance of each input in its own ADU^-2 (median of its weight map).

    Returns
    -------
    float
        e- per stack unit.
    """
    g = np.asarray(gains, dtype=float)
    f = np.asarray(factors, dtype=float)
    w = np.asarray(weights, dtype=float) / f**2
    if not (len(g) == len(f) == len(w)) or len(g) == 0:
        raise ValueError("gains, factors and weights must have the same, non-zero length")
    if np.any(g <= 0) or np.any(w <= 0) or np.any(f <= 0):
        raise ValueError("gains, factors and weights must be positive")
    return float(w.sum() ** 2 / np.sum(w**2 * f / g))


def saturation_level(saturates: Sequence[float], skies: Sequence[float], factors: Sequence[float]) -> float:
    """Saturation level of the stack in its units.

    The stack is background-subtracted, so an input saturates at ``SATURATE_i - sky_i`` of its
    ADU above the sky, i.e. ``f_i * (SATURATE_i - sky_i)`` stack units. The smallest value is
    kept: above it at least one input lost the pixel, and the stack value there rests on fewer
    frames than its weight map would suggest.

    Parameters
    ----------
    saturates : sequence of float
        Saturation level of each input (ADU).
    skies : sequence of float
        Sky level of each input (ADU).
    factors : sequence of float
        Flux factor of each input.
    """
    levels = [float(f) * (float(s) - float(b)) for s, b, f in zip(saturates, skies, factors, strict=True)]
    if not levels:
        raise ValueError("no inputs")
    return float(min(levels))
