"""The apertures of v1's photometry (v1-behaviour.md §7.2 item 4).

| SE column   | diameter                                  | header key |
|-------------|-------------------------------------------|------------|
| MAG_AUTO    | Kron (2.5, 3.5)                           | AUTO = 0   |
| MAG_APER    | 2 x 0.6731 x PEEING (Gaussian S/N optimum) | APER       |
| MAG_APER_1  | 2 x PEEING                                | APER_1     |
| MAG_APER_2  | 3 x PEEING                                | APER_2     |
| MAG_APER_3  | 3 arcsec                                  | APER_3     |
| MAG_APER_4  | 5 arcsec                                  | APER_4     |
| MAG_APER_5  | 10 arcsec                                 | APER_5     |

v1 converted the fixed apertures with 0.505 arcsec/px; here the image's own pixel scale is
used (identical for 7DT frames and tile-grid stacks).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Suffixes of the magnitude columns, in SExtractor's order.
SUFFIXES = ("AUTO", "APER", "APER_1", "APER_2", "APER_3", "APER_4", "APER_5")
#: Header keys of the zero points etc. for each suffix (v1 §7.2 item 11).
ZP_KEYS = {"AUTO": "AUTO", "APER": "0", "APER_1": "1", "APER_2": "2", "APER_3": "3", "APER_4": "4",
           "APER_5": "5"}
#: Gaussian S/N-optimal aperture radius in units of the FWHM.
OPTIMAL_RADIUS_FWHM = 0.6731


@dataclass(frozen=True)
class ApertureSet:
    """Aperture diameters (px) for one image; ``AUTO`` is 0 as in v1's header."""

    diameters: dict[str, float]

    def phot_apertures(self) -> list[float]:
        """The six MAG_APER diameters (px) in SExtractor's order."""
        return [self.diameters[s] for s in SUFFIXES[1:]]

    def header_cards(self) -> list[tuple[str, float, str]]:
        """(key, value, comment) of v1's aperture header keys ``AUTO APER APER_1 ... APER_5``."""
        notes = {"AUTO": "MAG_AUTO: Kron aperture (0 by convention)",
                 "APER": "[px] diameter: 2 x 0.6731 x PEEING",
                 "APER_1": "[px] diameter: 2 x PEEING",
                 "APER_2": "[px] diameter: 3 x PEEING",
                 "APER_3": "[px] diameter: 3 arcsec",
                 "APER_4": "[px] diameter: 5 arcsec",
                 "APER_5": "[px] diameter: 10 arcsec"}
        return [(s, round(self.diameters[s], 3), notes[s]) for s in SUFFIXES]


def aperture_set(peeing_px: float, pixscale_arcsec: float) -> ApertureSet:
    """v1's aperture diameters for a seeing of ``peeing_px`` (FWHM, px).

    Parameters
    ----------
    peeing_px : float
        Seeing FWHM in pixels (v1's PEEING).
    pixscale_arcsec : float
        Pixel scale (arcsec/px) used for the fixed 3, 5 and 10 arcsec apertures.
    """
    if not (peeing_px > 0 and pixscale_arcsec > 0):
        raise ValueError(f"seeing {peeing_px!r} px and pixel scale {pixscale_arcsec!r} must be positive")
    d = {"AUTO": 0.0,
         "APER": 2 * OPTIMAL_RADIUS_FWHM * peeing_px,
         "APER_1": 2 * peeing_px,
         "APER_2": 3 * peeing_px,
         "APER_3": 3.0 / pixscale_arcsec,
         "APER_4": 5.0 / pixscale_arcsec,
         "APER_5": 10.0 / pixscale_arcsec}
    return ApertureSet(d)
