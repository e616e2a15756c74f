"""Convolution kernel model: an Alard-Lupton basis with polynomial spatial variation.

The matching kernel at output pixel (x, y) is

    K(x, y; u) = a0 * B0(u) + sum_i sum_j c_ij * P_j(x, y) * B_i(u)

with ``B0`` a unit-sum Gaussian, ``B_i`` (i >= 1) Gaussians times monomials ``u^p v^q``
("Gaussian-Hermite", Alard & Lupton 1998) made zero-sum and orthonormal, and ``P_j`` the
monomials of the region's normalised coordinates up to the spatial order. Because only ``B0``
carries flux, the kernel sum (the photometric ratio of the two images) is ``a0`` everywhere
in a region, while the kernel shape varies smoothly. A differential background
``sum_k b_k P_k(x, y)`` of its own order is fitted with it.

Chosen over a delta-function basis because a few dozen smooth basis functions need no
regularisation and are well constrained by ~100 stamps per region. The Gaussian widths scale
with the width of the matching kernel measured from the two PSFs (HOTPANTS' default widths
0.7, 1.5, 3.0 px correspond to a matching kernel of sigma = 1.5 px).

Units: pixel coordinates are 0-based (NumPy order ``[y, x]``); widths and half-widths are in
pixels of the science grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def spatial_terms(order: int) -> list[tuple[int, int]]:
    """Exponents ``(a, b)`` of the monomials ``u**a * v**b`` with ``a + b <= order``.

    Parameters
    ----------
    order : int
        Polynomial order (0 = constant).

    Returns
    -------
    list of (int, int)
        ``[(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), ...]``; ``u`` runs along x.
    """
    if order < 0:
        raise ValueError(f"polynomial order must be >= 0, got {order}")
    return [(d - b, b) for d in range(order + 1) for b in range(d + 1)]


@dataclass(frozen=True)
class BasisSpec:
    """Shape of a kernel basis.

    Attributes
    ----------
    half_width : int
        Kernel half-width r (px); the kernel is (2r+1) x (2r+1).
    sigmas : tuple of float
        Gaussian widths (px), the first one carries the flux.
    degrees : tuple of int
        Maximum polynomial degree multiplying each Gaussian.
    """

    half_width: int
    sigmas: tuple[float, ...]
    degrees: tuple[int, ...]

    @property
    def size(self) -> int:
        return 2 * self.half_width + 1


def design_basis(fwhm_convolved: float, fwhm_target: float, *, degrees: tuple[int, ...] = (6, 4, 2, 0),
                 width_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0), min_sigma_match: float = 1.0,
                 half_width: int | None = None, max_half_width: int = 25) -> BasisSpec:
    """Basis widths and kernel size from the PSF sizes of the two images.

    Parameters
    ----------
    fwhm_convolved : float
        FWHM (px) of the image that is convolved (the sharper one).
    fwhm_target : float
        FWHM (px) of the image it is matched to.
    degrees : tuple of int
        Polynomial degree for each Gaussian. HOTPANTS uses (6, 4, 2) for widths (0.5, 1, 2)
        times the matching width; a fourth, wide Gaussian (degree 0) is added here so that the
        kernel can carry the extended wings of Moffat-like PSFs (without it the kernel sum came
        out 0.8 % low on beta = 3 Moffat stars, with it 0.3 %).
    width_ratios : tuple of float
        Gaussian widths as multiples of the matching width
        ``sigma_m = sqrt(sigma_target**2 - sigma_convolved**2)``, floored at
        ``min_sigma_match`` (px) so that near-equal PSFs still get a usable basis.
    half_width : int, optional
        Force the kernel half-width (px); default ``max(2.5 * widest sigma, 1.5 * FWHM_target)``
        clipped to [4, ``max_half_width``].

    Returns
    -------
    BasisSpec
    """
    if len(degrees) != len(width_ratios):
        raise ValueError("degrees and width_ratios must have the same length")
    s_conv = max(float(fwhm_convolved), 0.0) / FWHM_PER_SIGMA
    s_targ = max(float(fwhm_target), 0.0) / FWHM_PER_SIGMA
    s_match = math.sqrt(max(s_targ ** 2 - s_conv ** 2, 0.0))
    s_base = max(s_match, min_sigma_match)
    sigmas = tuple(round(max(0.4, f * s_base), 4) for f in width_ratios)
    if half_width is None:
        half_width = int(math.ceil(max(2.5 * max(sigmas), 1.5 * float(fwhm_target))))
        half_width = int(min(max(half_width, 4), max_half_width))
    return BasisSpec(half_width=int(half_width), sigmas=sigmas, degrees=tuple(int(d) for d in degrees))


@dataclass(frozen=True)
class SeparableBasis:
    """A kernel basis as linear combinations of separable functions.

    ``images = transform @ raw`` where raw function k is ``outer(factors[pairs[k][1]],
    factors[pairs[k][0]])`` (y factor, x factor): each raw function is a Gaussian times
    ``x**p * y**q``, the product of two 1-D factors. Convolving a stamp with the raw functions
    takes two 1-D passes (matrix products), much cheaper than one 2-D FFT per basis image.

    Attributes
    ----------
    images : ndarray (n_basis, k, k)
    factors : ndarray (n_factors, k)
        1-D factors ``exp(-t^2 / 2 sigma^2) t^p`` on t = -r..r.
    pairs : ndarray (n_raw, 2) of int
        (x factor, y factor) of each raw function.
    transform : ndarray (n_basis, n_raw)
    """

    images: np.ndarray
    factors: np.ndarray
    pairs: np.ndarray
    transform: np.ndarray


def separable_basis(spec: BasisSpec, rel_tol: float = 1e-7) -> SeparableBasis:
    """The kernel basis of ``spec`` (see :func:`gaussian_hermite_basis`) in separable form."""
    r = spec.half_width
    t = np.arange(-r, r + 1, dtype=np.float64)
    factors, pairs = [], []
    for sigma, deg in zip(spec.sigmas, spec.degrees, strict=True):
        g = np.exp(-t ** 2 / (2.0 * sigma ** 2))
        first = len(factors)
        factors.extend(g * t ** p for p in range(deg + 1))
        pairs.extend((first + p, first + q) for p in range(deg + 1) for q in range(deg + 1 - p))
    factors = np.array(factors)
    pairs = np.array(pairs, dtype=int)
    raw = np.einsum("ky,kx->kyx", factors[pairs[:, 1]], factors[pairs[:, 0]]).reshape(len(pairs), -1)
    nraw = len(pairs)
    rows = []                                   # raw -> zero-sum, unit-norm functions
    t0 = np.zeros(nraw)
    t0[0] = 1.0 / raw[0].sum()
    for k in range(1, nraw):
        row = np.zeros(nraw)
        s = raw[k].sum()
        if abs(s) > 1e-12 * np.abs(raw[k]).sum():
            row[k] = 1.0 / s
            row -= t0
        else:
            row[k] = 1.0
        f = row @ raw
        norm = math.sqrt(float(f @ f))
        if norm > 0:
            rows.append(row / norm)
    m = np.array(rows)
    u, sv, _ = np.linalg.svd(m @ raw, full_matrices=False)
    keep = sv > rel_tol * sv[0]
    ortho_t = (u[:, keep] / sv[keep]).T @ m      # rows of V^T as combinations of raw functions
    transform = np.concatenate([t0[None], ortho_t], axis=0)
    images = (transform @ raw).reshape(-1, spec.size, spec.size)
    return SeparableBasis(images=images, factors=factors, pairs=pairs, transform=transform)


def gaussian_hermite_basis(spec: BasisSpec, rel_tol: float = 1e-7) -> np.ndarray:
    """Kernel basis images for ``spec``.

    Returns
    -------
    numpy.ndarray, shape (n, 2r+1, 2r+1), float64
        ``[0]`` is the first Gaussian normalised to unit sum. ``[1:]`` are the remaining
        Gaussian x monomial functions, each made zero-sum (even-even terms have ``[0]``
        subtracted after normalising to unit sum) and then orthonormalised; numerically
        degenerate combinations (relative singular value below ``rel_tol``) are dropped.
    """
    return separable_basis(spec, rel_tol).images


def normalised_coords(x, y, bounds: tuple[int, int, int, int]):
    """Region-normalised coordinates ``u, v`` in [-1, 1].

    Parameters
    ----------
    x, y : float or array
        Pixel coordinates (0-based, full image).
    bounds : (y0, y1, x0, x1)
        The region, half-open pixel ranges.
    """
    y0, y1, x0, x1 = bounds
    xc = 0.5 * (x0 + x1 - 1)
    yc = 0.5 * (y0 + y1 - 1)
    hx = max(0.5 * (x1 - x0 - 1), 1.0)
    hy = max(0.5 * (y1 - y0 - 1), 1.0)
    return (x - xc) / hx, (y - yc) / hy


def clamp_uv(u, v, box: tuple[float, float, float, float] | None):
    """Clip normalised coordinates to ``box = (u_min, u_max, v_min, v_max)`` (None: unchanged)."""
    if box is None:
        return u, v
    return np.clip(u, box[0], box[1]), np.clip(v, box[2], box[3])


def poly_values(u, v, terms: list[tuple[int, int]], xp=np):
    """Monomials ``u**a * v**b`` stacked on a new last axis (shape ``u.shape + (n_terms,)``)."""
    u = xp.asarray(u, dtype=xp.float64)
    v = xp.asarray(v, dtype=xp.float64)
    return xp.stack([u ** a * v ** b for a, b in terms], axis=-1)


@dataclass
class KernelSolution:
    """A fitted, spatially varying kernel plus differential background for one region.

    Attributes
    ----------
    basis : ndarray (n_basis, s, s)
        Basis images (``[0]`` unit sum, the rest zero sum).
    terms : list of (int, int)
        Spatial monomials of the kernel shape.
    flux : float
        Kernel sum ``a0`` (target flux / convolved-image flux).
    coeffs : ndarray (n_basis - 1, n_terms)
        Coefficients of the zero-sum basis images for each spatial term.
    bg_terms : list of (int, int)
        Spatial monomials of the differential background.
    bg_coeffs : ndarray (n_bg,)
        Background coefficients (target image units).
    bounds : (y0, y1, x0, x1)
        The region the polynomials are normalised to.
    uv_box : (u_min, u_max, v_min, v_max), optional
        The normalised coordinates the fit constrains (its stamps' centres). The kernel shape
        is evaluated at the nearest point of this box: a quadratic in the coordinates,
        extrapolated to a region's corners where no stamp was, can bend far from any real
        PSF. None = no clamping.
    """

    basis: np.ndarray
    terms: list[tuple[int, int]]
    flux: float
    coeffs: np.ndarray
    bg_terms: list[tuple[int, int]]
    bg_coeffs: np.ndarray
    bounds: tuple[int, int, int, int]
    uv_box: tuple[float, float, float, float] | None = None
    _term_kernels: np.ndarray | None = field(default=None, repr=False)

    @property
    def half_width(self) -> int:
        return (self.basis.shape[-1] - 1) // 2

    @property
    def order(self) -> int:
        return max(a + b for a, b in self.terms)

    def term_kernels(self) -> np.ndarray:
        """Kernel images ``K_j`` multiplying each spatial monomial ``P_j`` (float64)."""
        if self._term_kernels is None:
            kj = np.tensordot(self.coeffs.T, self.basis[1:], axes=1)
            kj[0] = kj[0] + self.flux * self.basis[0]
            self._term_kernels = kj
        return self._term_kernels

    def clamp(self, u, v):
        """``u, v`` moved to the nearest point of :attr:`uv_box` (unchanged without a box)."""
        return clamp_uv(u, v, self.uv_box)

    def kernel_at(self, x: float, y: float) -> np.ndarray:
        """The kernel image at pixel (x, y) of the full image."""
        u, v = self.clamp(*normalised_coords(float(x), float(y), self.bounds))
        p = np.array([u ** a * v ** b for a, b in self.terms])
        return np.tensordot(p, self.term_kernels(), axes=1)

    def background_at(self, x, y):
        """Differential background (target units) at pixel coordinates (arrays allowed)."""
        u, v = normalised_coords(np.asarray(x, float), np.asarray(y, float), self.bounds)
        return sum(c * u ** a * v ** b for c, (a, b) in zip(self.bg_coeffs, self.bg_terms, strict=True))
