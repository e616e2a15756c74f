"""The simulated sky: a Gaia-like star field per target.

Stars have Gaia DR3-like astrometry at epoch 2016.0 (ra, dec, parallax, pmra, pmdec) and
photometry (G, BP-RP); the magnitude in any 7DT filter follows
:func:`gppy.sim.instrument.colour_term`. Magnitudes are drawn from ``dN/dm ~ 10^(slope*m)``
between ``mag_bright`` and ``mag_faint``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gppy.sim.instrument import colour_term, get_filter
from gppy.sim.optics import tan_deproject, tan_project

GAIA_EPOCH = 2016.0
MAS_PER_DEG = 3.6e6


@dataclass
class StarField:
    """Stars of one target (true values)."""

    source_id: np.ndarray
    ra: np.ndarray            # deg, epoch 2016.0
    dec: np.ndarray           # deg, epoch 2016.0
    pmra: np.ndarray          # mas/yr, includes cos(dec)
    pmdec: np.ndarray         # mas/yr
    parallax: np.ndarray      # mas (true)
    gmag: np.ndarray
    bp_rp: np.ndarray

    def __len__(self) -> int:
        return int(self.ra.size)

    def positions_at(self, epoch_year: float) -> tuple[np.ndarray, np.ndarray]:
        """True (ra, dec) at ``epoch_year`` (Julian year), linear proper motion on the tangent
        plane of each star."""
        dt = epoch_year - GAIA_EPOCH
        dra = self.pmra * dt / MAS_PER_DEG / np.cos(np.deg2rad(self.dec))
        ddec = self.pmdec * dt / MAS_PER_DEG
        return np.mod(self.ra + dra, 360.0), self.dec + ddec

    def mag(self, filt: str) -> np.ndarray:
        """True AB magnitude in filter ``filt``."""
        return self.gmag + colour_term(get_filter(filt).wave_nm, self.bp_rp)


def make_starfield(ra0: float, dec0: float, half_width_deg: float, half_height_deg: float,
                   density: float, rng: np.random.Generator, mag_bright: float = 10.0,
                   mag_faint: float = 21.5, slope: float = 0.2, id_base: int = 0) -> StarField:
    """Stars uniformly distributed on the tangent plane of (ra0, dec0) in a box.

    Parameters
    ----------
    density : float
        Stars per square degree with ``mag_bright < G < mag_faint``.
    """
    area = 4.0 * half_width_deg * half_height_deg
    n = int(rng.poisson(density * area))
    xi = rng.uniform(-half_width_deg, half_width_deg, n)
    eta = rng.uniform(-half_height_deg, half_height_deg, n)
    ra, dec = tan_deproject(xi, eta, ra0, dec0)
    # inverse-CDF sampling of dN/dm ~ 10^(slope m)
    u = rng.uniform(0, 1, n)
    a = slope * np.log(10.0)
    lo, hi = np.exp(a * mag_bright), np.exp(a * mag_faint)
    gmag = np.log(lo + u * (hi - lo)) / a
    bp_rp = np.clip(rng.normal(1.0, 0.35, n), 0.1, 3.2)
    # distances: brighter stars nearer on average (toy), parallax in mas
    dist_pc = np.clip(10 ** (0.2 * (gmag - rng.normal(4.5, 1.5, n)) + 1.0), 30.0, 3e4)
    parallax = 1000.0 / dist_pc
    vt = rng.normal(0.0, 35.0, (2, n))                    # km/s tangential velocity
    pm = vt / (4.74 * dist_pc / 1000.0)                    # mas/yr
    fast = rng.uniform(0, 1, n) < 0.01                     # a few high-proper-motion stars
    pm[:, fast] = rng.normal(0.0, 250.0, (2, int(fast.sum())))
    sid = id_base + np.arange(n, dtype=np.int64) * 7919 + rng.integers(0, 7919, n)
    order = np.argsort(sid)
    return StarField(sid[order], ra[order], dec[order], pm[0][order], pm[1][order], parallax[order],
                     gmag[order], bp_rp[order])


def inside_box(field: StarField, ra0: float, dec0: float, hw: float, hh: float) -> np.ndarray:
    """Mask of stars within the tangent-plane box (deg) about (ra0, dec0)."""
    xi, eta = tan_project(field.ra, field.dec, ra0, dec0)
    return (np.abs(xi) <= hw) & (np.abs(eta) <= hh)
