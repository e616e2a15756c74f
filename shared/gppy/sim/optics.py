"""Geometry and PSF of a simulated exposure.

Pixel coordinates in this module are **0-based** (pixel ``i`` covers ``i-0.5 .. i+0.5``);
FITS pixel = 0-based + 1.

The true WCS of a frame is a TPV projection: intermediate coordinates
``(xi, eta) = CD @ (p - CRPIX)`` (degrees), distorted by the TPV polynomial
``xi' = PV1_1 xi + PV1_4 xi^2 + PV1_5 xi eta + PV1_6 eta^2 + PV1_7 xi^3 + PV1_9 xi eta^2``
(``PV2_*`` with ``xi``/``eta`` swapped), then a gnomonic (TAN) projection around CRVAL. The
radial part (``PV1_7 = PV1_9 = PV2_7 = PV2_9 = k``) is a pincushion distortion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from gppy.sim.instrument import PIXEL_SCALE

_D2R = np.pi / 180.0


def tan_project(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic projection of (ra, dec) (deg) about (ra0, dec0): standard coordinates (deg)."""
    a = np.asarray(ra, dtype=float) * _D2R
    d = np.asarray(dec, dtype=float) * _D2R
    a0, d0 = ra0 * _D2R, dec0 * _D2R
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return xi / _D2R, eta / _D2R


def tan_deproject(xi: np.ndarray, eta: np.ndarray, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`tan_project`: standard coordinates (deg) -> (ra, dec) (deg)."""
    x = np.asarray(xi, dtype=float) * _D2R
    y = np.asarray(eta, dtype=float) * _D2R
    a0, d0 = ra0 * _D2R, dec0 * _D2R
    denom = np.cos(d0) - y * np.sin(d0)
    ra = a0 + np.arctan2(x, denom)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom))
    return np.mod(ra / _D2R, 360.0), dec / _D2R


def offset_radec(ra: float, dec: float, dx_arcsec: float, dy_arcsec: float) -> tuple[float, float]:
    """Move (ra, dec) by (dx east, dy north) arcsec on the tangent plane."""
    r, d = tan_deproject(np.array([dx_arcsec / 3600.0]), np.array([dy_arcsec / 3600.0]), ra, dec)
    return float(r[0]), float(d[0])


@dataclass
class FrameWCS:
    """True astrometric model of one frame (TPV, see the module docstring).

    Attributes
    ----------
    ra0, dec0 : float
        CRVAL (deg), the sky position of the optical centre.
    crpix : (float, float)
        CRPIX, FITS 1-based (the optical axis).
    rotation_deg : float
        ``CD = R(rotation) @ diag(-s, s)``: 0 is north up, east left; positive turns the
        image axes counter-clockwise on the sky (ROTANG1 = rotation).
    scale_arcsec : float
        Pixel scale (arcsec / px).
    pv1, pv2 : dict
        TPV coefficients ``{j: value}`` (j = 0..10); missing ones are 0 (PV?_1 = 1).
    """

    ra0: float
    dec0: float
    crpix: tuple[float, float]
    rotation_deg: float = 0.0
    scale_arcsec: float = PIXEL_SCALE
    pv1: dict[int, float] = field(default_factory=dict)
    pv2: dict[int, float] = field(default_factory=dict)

    @property
    def cd(self) -> np.ndarray:
        s = self.scale_arcsec / 3600.0
        c, n = np.cos(self.rotation_deg * _D2R), np.sin(self.rotation_deg * _D2R)
        return np.array([[c, -n], [n, c]]) @ np.diag([-s, s])

    def _coef(self, pv: dict[int, float], j: int) -> float:
        return pv.get(j, 1.0 if j == 1 else 0.0)

    def _poly(self, xi: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for pv, (x, y) in ((self.pv1, (xi, eta)), (self.pv2, (eta, xi))):
            c = [self._coef(pv, j) for j in range(11)]
            out.append(c[0] + c[1] * x + c[2] * y + c[4] * x * x + c[5] * x * y + c[6] * y * y
                       + c[7] * x ** 3 + c[8] * x * x * y + c[9] * x * y * y + c[10] * y ** 3)
        return out[0], out[1]

    def _poly_jac(self, xi: np.ndarray, eta: np.ndarray) -> np.ndarray:
        jac = []
        for pv, (x, y) in ((self.pv1, (xi, eta)), (self.pv2, (eta, xi))):
            c = [self._coef(pv, j) for j in range(11)]
            dx = c[1] + 2 * c[4] * x + c[5] * y + 3 * c[7] * x * x + 2 * c[8] * x * y + c[9] * y * y
            dy = c[2] + c[5] * x + 2 * c[6] * y + c[8] * x * x + 2 * c[9] * x * y + 3 * c[10] * y * y
            jac.append((dx, dy))
        # first row: d(xi')/d(xi), d(xi')/d(eta); second: d(eta')/d(xi), d(eta')/d(eta)
        (a, b), (dy_e, dx_e) = jac[0], jac[1]
        return np.array([[a, b], [dx_e, dy_e]])

    def pixel_to_world(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel -> (ra, dec) deg."""
        px = np.asarray(x, dtype=float) + 1.0 - self.crpix[0]
        py = np.asarray(y, dtype=float) + 1.0 - self.crpix[1]
        cd = self.cd
        xi = cd[0, 0] * px + cd[0, 1] * py
        eta = cd[1, 0] * px + cd[1, 1] * py
        xi2, eta2 = self._poly(xi, eta)
        return tan_deproject(xi2, eta2, self.ra0, self.dec0)

    def world_to_pixel(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) deg -> 0-based pixel (Newton inversion of the TPV polynomial)."""
        xt, et = tan_project(ra, dec, self.ra0, self.dec0)
        xi, eta = xt.copy(), et.copy()
        for _ in range(8):
            fx, fy = self._poly(xi, eta)
            rx, ry = fx - xt, fy - et
            (a, b), (c, d) = self._poly_jac(xi, eta)
            det = a * d - b * c
            xi = xi - (d * rx - b * ry) / det
            eta = eta - (-c * rx + a * ry) / det
            if np.all(np.abs(rx) < 1e-12) and np.all(np.abs(ry) < 1e-12):
                break
        inv = np.linalg.inv(self.cd)
        px = inv[0, 0] * xi + inv[0, 1] * eta
        py = inv[1, 0] * xi + inv[1, 1] * eta
        return px + self.crpix[0] - 1.0, py + self.crpix[1] - 1.0

    def header(self) -> fits.Header:
        """The true WCS as FITS cards (RA---TPV / DEC--TPV, CD matrix, PV1_0..10, PV2_0..10)."""
        h = fits.Header()
        h["CTYPE1"] = "RA---TPV"
        h["CTYPE2"] = "DEC--TPV"
        h["CUNIT1"] = "deg"
        h["CUNIT2"] = "deg"
        h["RADESYS"] = "ICRS"
        h["EQUINOX"] = 2000.0
        h["CRVAL1"] = self.ra0
        h["CRVAL2"] = self.dec0
        h["CRPIX1"] = self.crpix[0]
        h["CRPIX2"] = self.crpix[1]
        cd = self.cd
        h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = cd[0, 0], cd[0, 1], cd[1, 0], cd[1, 1]
        for i, pv in ((1, self.pv1), (2, self.pv2)):
            for j in range(11):
                if j == 3:
                    continue
                h[f"PV{i}_{j}"] = self._coef(pv, j)
        return h

    def tan_header(self) -> fits.Header:
        """A plain TAN header (used when the model has no distortion terms)."""
        h = self.header()
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
        for i in (1, 2):
            for j in range(11):
                h.remove(f"PV{i}_{j}", ignore_missing=True)
        return h


def distortion_coefficients(size: tuple[int, int], corner_arcsec: float, quad_arcsec: float,
                            rng: np.random.Generator) -> tuple[dict[int, float], dict[int, float]]:
    """TPV coefficients of a radial (pincushion) distortion moving the corners by
    ``corner_arcsec`` plus a small random quadratic (tilt) term of ``quad_arcsec`` there."""
    nx, ny = size
    rc = np.hypot(nx / 2.0, ny / 2.0) * PIXEL_SCALE / 3600.0      # deg
    k = corner_arcsec / 3600.0 / rc ** 3 if corner_arcsec else 0.0
    q = quad_arcsec / 3600.0 / rc ** 2 if quad_arcsec else 0.0
    qa = rng.uniform(-1, 1, 6) * q
    pv1 = {1: 1.0, 4: qa[0], 5: qa[1], 6: qa[2], 7: k, 9: k}
    pv2 = {1: 1.0, 4: qa[3], 5: qa[4], 6: qa[5], 7: k, 9: k}
    return pv1, pv2


@dataclass
class PSFModel:
    """Moffat PSF of one frame, varying across the field.

    ``FWHM(r) = fwhm_arcsec * (1 + field_growth * rho^2)`` with ``rho`` = distance from the
    optical centre / distance of a corner; the ellipticity is the sum (as a spin-2 vector) of a
    constant part ``(e0, theta0)`` and a radial part ``e_field * rho^2``. FWHM is the geometric
    mean of the major and minor axes; ``e = 1 - b/a``.
    """

    fwhm_arcsec: float
    beta: float
    field_growth: float = 0.12
    e0: float = 0.03
    theta0_deg: float = 0.0
    e_field: float = 0.06

    def at(self, x: np.ndarray, y: np.ndarray, size: tuple[int, int],
           scale: float = PIXEL_SCALE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-position (FWHM px, ellipticity, position angle rad) at 0-based pixel (x, y)."""
        nx, ny = size
        cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
        rc2 = (nx / 2.0) ** 2 + (ny / 2.0) ** 2
        dx, dy = np.asarray(x, float) - cx, np.asarray(y, float) - cy
        rho2 = (dx * dx + dy * dy) / rc2
        fwhm = self.fwhm_arcsec / scale * (1.0 + self.field_growth * rho2)
        phi = np.arctan2(dy, dx)
        t0 = np.deg2rad(self.theta0_deg)
        e1 = self.e0 * np.cos(2 * t0) + self.e_field * rho2 * np.cos(2 * phi)
        e2 = self.e0 * np.sin(2 * t0) + self.e_field * rho2 * np.sin(2 * phi)
        return fwhm, np.clip(np.hypot(e1, e2), 0.0, 0.5), 0.5 * np.arctan2(e2, e1)

    def to_dict(self) -> dict:
        return {"model": "elliptical Moffat", "fwhm_center_arcsec": self.fwhm_arcsec, "beta": self.beta,
                "field_growth": self.field_growth, "e0": self.e0, "theta0_deg": self.theta0_deg,
                "e_field": self.e_field,
                "formula": "FWHM = fwhm_center*(1+field_growth*rho^2); e = |e0*exp(2i*theta0) + "
                           "e_field*rho^2*exp(2i*phi)|; rho = r/r_corner from the frame centre"}


def moffat_alpha(fwhm: np.ndarray, beta: np.ndarray | float) -> np.ndarray:
    """Moffat core width alpha for a given FWHM (same units)."""
    return np.asarray(fwhm) / (2.0 * np.sqrt(2.0 ** (1.0 / np.asarray(beta)) - 1.0))


def moffat_neff(fwhm: np.ndarray | float, beta: float) -> np.ndarray:
    """Noise-equivalent area (px^2) of a Moffat PSF, ``1 / sum(p^2)``."""
    a = moffat_alpha(fwhm, beta)
    return np.pi * a * a * (2 * beta - 1) / (beta - 1) ** 2
