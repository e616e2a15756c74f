"""Instrument, site and filter model of a simulated 7DT unit.

Numbers follow the 7DT facts in the reference material: 0.505"/px, C3-61000 sensor
(9576 x 6388 px, 3.76 um), EGAIN 0.256 e-/ADU in the gain-2750 mode, 50.5 cm aperture with a
29.8 cm central obstruction, f = 1537.3 mm. Throughput, sky brightness and extinction are
plausible smooth curves, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PIXEL_SCALE = 0.505            # arcsec / px
FULL_SIZE = (9576, 6388)       # (NAXIS1, NAXIS2)
SMALL_SIZE = (1536, 1024)
EGAIN = 0.256                  # e- / ADU (gain-2750 mode)
GAIN_SETTING = 2750            # camera gain setting written as GAIN
READ_NOISE_E = 3.0             # e- rms
BIAS_LEVEL = 500.0             # ADU
ADC_MAX = 65535                # 16-bit ceiling (ADU, raw)
DARK_CURRENT_E = 0.01          # e- / s / px
CCD_TEMP = -10.0               # deg C
PIXEL_SIZE_UM = 3.76
FOCAL_LENGTH_MM = 1537.3
FOCAL_RATIO = 3.04
COLLECTING_AREA_M2 = np.pi * (0.505 ** 2 - 0.298 ** 2) / 4.0
INSTRUMENT = "C3-61000 Pro"

# El Sauce Observatory (Chile), where the 7DT units are.
SITE_LAT = -30.4725
SITE_LON = -70.7631
SITE_ELEV = 1560.0

MEDIUM_BANDS = [f"m{w}" for w in range(400, 876, 25)]
BROAD_BANDS = ["u", "g", "r", "i", "z"]
ALL_FILTERS = MEDIUM_BANDS + BROAD_BANDS
DEFAULT_FILTERS = ["m425", "m650", "r"]

_BROAD = {"u": (355.0, 60.0), "g": (475.0, 140.0), "r": (620.0, 140.0), "i": (760.0, 150.0),
          "z": (900.0, 120.0)}


@dataclass(frozen=True)
class Filter:
    """A filter: central wavelength and width (nm)."""

    name: str
    wave_nm: float
    width_nm: float

    @property
    def wave_um(self) -> float:
        return self.wave_nm / 1000.0


def get_filter(name: str) -> Filter:
    """The :class:`Filter` called ``name`` (``m400``...``m875``, ``u g r i z``)."""
    if name in _BROAD:
        w, dw = _BROAD[name]
        return Filter(name, w, dw)
    if name.startswith("m") and name[1:].isdigit():
        return Filter(name, float(name[1:]), 25.0)
    raise ValueError(f"unknown filter {name!r}; use m400..m875 or u g r i z")


def efficiency(wave_nm: float) -> float:
    """Total system efficiency (optics x filter peak x QE), dimensionless."""
    return 0.52 * float(np.exp(-((wave_nm - 580.0) / 360.0) ** 2))


def extinction(wave_nm: float) -> float:
    """Atmospheric extinction coefficient (mag / airmass)."""
    return 0.012 + 0.28 * (400.0 / wave_nm) ** 4 * 0.5 + 0.02


def sky_brightness(wave_nm: float) -> float:
    """Sky surface brightness (AB mag / arcsec^2), grey-ish moonlit sky."""
    return float(np.interp(wave_nm, [350, 400, 500, 600, 700, 800, 900],
                           [20.6, 20.7, 20.6, 20.3, 19.9, 19.4, 18.9]))


def zp_electrons_1s(filt: Filter) -> float:
    """AB magnitude of a source giving 1 e-/s above the atmosphere (zenith, no losses)."""
    h = 6.62607015e-34
    c = 2.99792458e8
    nu = c / (filt.wave_nm * 1e-9)
    dnu = c * filt.width_nm * 1e-9 / (filt.wave_nm * 1e-9) ** 2
    photons_m0 = 3631e-26 * dnu / (h * nu)             # photons / s / m^2 of an AB=0 source
    rate = photons_m0 * COLLECTING_AREA_M2 * efficiency(filt.wave_nm)
    return 2.5 * float(np.log10(rate))


def zp_adu(filt: Filter, exptime: float, airmass: float, transparency_mag: float = 0.0,
           gain: float = EGAIN) -> float:
    """Zero point: AB mag of a source giving 1 ADU in the whole exposure (flat-fielded)."""
    zp = zp_electrons_1s(filt) + 2.5 * np.log10(max(exptime, 1e-6)) - 2.5 * np.log10(gain)
    return float(zp - extinction(filt.wave_nm) * airmass - transparency_mag)


def sky_adu(filt: Filter, exptime: float, airmass: float, delta_mag: float = 0.0,
            gain: float = EGAIN) -> float:
    """Sky level (ADU per pixel, flat-fielded) of an exposure."""
    mu = sky_brightness(filt.wave_nm) + delta_mag - 0.15 * (airmass - 1.0)
    e_per_s = 10 ** (-0.4 * (mu - zp_electrons_1s(filt))) * PIXEL_SCALE ** 2
    return float(e_per_s * exptime / gain)


def colour_term(wave_nm: np.ndarray | float, bp_rp: np.ndarray | float) -> np.ndarray:
    """``mag(filter) - G`` for a star of Gaia colour ``bp_rp`` (a smooth toy SED model)."""
    lam = np.asarray(wave_nm, dtype=float) / 1000.0
    c = np.asarray(bp_rp, dtype=float)
    return 2.2 * (0.64 - lam) * (c - 0.8) + 0.45 * (0.64 - lam) ** 2 - 0.05
