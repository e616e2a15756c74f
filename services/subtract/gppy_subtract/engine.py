"""The native subtraction engine: PSF-matched difference, noise and mask images.

Steps (each timed):

1. ``stamps``: stars found in both images (:mod:`.stamps`); their median FWHMs decide the
   direction (the sharper image is convolved, unless forced) and the kernel basis
   (:func:`.kernel.design_basis`).
2. ``fit``: the image is split into ``nx x ny`` regions (v1's ``-nrx 3 -nry 2``); each region
   gets its own kernel and background solution from its stamps (:mod:`.solve`). A region
   without enough stamps uses a solution fitted over the whole image.
3. ``convolution``: the convolved image of each region, with the kernel evaluated at every
   pixel (:func:`.convolve.convolve_polynomial`), plus the differential background.
4. ``noise``: per-pixel variance of the difference: the unconvolved image's variance (weight
   map plus photon noise) plus the convolved image's variance convolved with the squared
   kernel; scaled to the science photometric system.
5. ``mask``: science mask bits, ``REFERENCE`` where the reference is masked, ``GROWN`` where
   a masked pixel of the convolved image reaches through the kernel footprint, ``EDGE`` within
   a kernel half-width of the image border.

The difference is always on the science image's photometric scale (HOTPANTS ``-n i``):
``D = S - (K * R + B)`` when the reference is convolved, ``D = ((K * S + B) - R) / sum(K)``
when the science is, so the science zero point applies to it and new sources are positive.
Masked pixels of the difference, noise and convolved images are 0 (as v1 wrote them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from gppy.masks import MaskBit
from gppy.xp import backend_name, to_host

from . import stamps as st
from .backend import fft_for
from .convolve import convolve_polynomial, convolve_tilewise, dilate, polynomial_image
from .kernel import BasisSpec, design_basis, gaussian_hermite_basis
from .solve import FitError, FitResult, StampData, fit_kernel

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The subtraction cannot be done (no common stars, no usable stamps)."""


@dataclass
class Plane:
    """One input image on the common grid.

    Attributes
    ----------
    data : array (H, W) float32
        Pixel values (the image's own units).
    var : array (H, W) float32
        Background variance (units^2), i.e. 1 / weight; <= 0 where unknown.
    mask : array (H, W) uint16
        :class:`gppy.masks.MaskBit` bits; non-zero = unusable.
    egain : float, optional
        e- per unit of ``data`` (photon noise of sources); None = not added.
    saturate : float, optional
        Saturation level in the units of ``data``.
    """

    data: object
    var: object
    mask: object
    egain: float | None = None
    saturate: float | None = None


@dataclass
class EngineParams:
    """Settings of the native engine (defaults follow v1/HOTPANTS where it had one).

    Attributes
    ----------
    nregions : (nx, ny)
        Regions along x and y, each with its own kernel (v1 ``-nrx 3 -nry 2``).
    convolve : 'auto' | 'reference' | 'science'
        Which image to convolve; 'auto' convolves the one with the smaller FWHM.
    kernel_order, bg_order : int
        Spatial polynomial orders of kernel and background (HOTPANTS ``-ko 2 -bgo 1``).
    half_width, stamp_half_width : int, optional
        Kernel and stamp half-widths (px); default from the FWHMs.
    stamp_grid : (nx, ny)
        Stamp cells per region (HOTPANTS ``-nsx 10 -nsy 10``).
    per_cell : int
        Stars fitted per cell. HOTPANTS keeps ``-nss 3`` candidates per stamp but fits one at a
        time (the others replace rejected ones); 1 here, rejected stamps are simply dropped
        (100 stamps per region fit as well as 300 and cost a third).
    detect_snr : float
        Minimum peak pixel S/N of a stamp star in both images.
    sat_fraction : float
        Stars whose peak exceeds this fraction of SATURATE are not used.
    clip : float
        Stamp rejection threshold (robust sigmas of reduced chi^2).
    min_stamps : int
        A region with fewer usable stamps uses the kernel fitted over the whole image (which
        itself needs 4).
    max_iter : int
        Maximum rejection iterations.
    tile : int
        FFT tile size (px).
    degrees, width_ratios : tuple
        Kernel basis: polynomial degree per Gaussian and Gaussian widths relative to the
        matching width.
    photon_noise : bool
        Add the sources' photon noise (from EGAIN) to the noise image.
    mask_growth : 'footprint' | 'light'
        How masked pixels of the convolved image spoil the difference (``GROWN``): the whole
        kernel footprint around each (HOTPANTS), or only where the light they may have held,
        estimated from the other image, matters against the noise (:func:`_grown_mask`; the
        footprint still around saturated pixels). On a stack with a few bad columns and hot
        pixels and a 20-px kernel the footprint rule masks 15-40 % of the difference.
    """

    nregions: tuple[int, int] = (3, 2)
    convolve: Literal["auto", "reference", "science"] = "auto"
    kernel_order: int = 2
    bg_order: int = 1
    half_width: int | None = None
    stamp_half_width: int | None = None
    stamp_grid: tuple[int, int] = (10, 10)
    per_cell: int = 1
    detect_snr: float = 10.0
    sat_fraction: float = 0.8
    clip: float = 3.0
    min_stamps: int = 10
    max_iter: int = 6
    tile: int = 256
    degrees: tuple[int, ...] = (6, 4, 2, 0)
    width_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    photon_noise: bool = True
    mask_growth: Literal["footprint", "light"] = "footprint"


@dataclass
class RegionFit:
    """The kernel fit of one region."""

    bounds: tuple[int, int, int, int]
    fit: FitResult
    n_stamps: int
    fallback: bool = False

    @property
    def solution(self):
        return self.fit.solution


@dataclass
class SubtractionResult:
    """Products and diagnostics of :func:`subtract`.

    Attributes
    ----------
    diff : array (H, W) float32
        Difference on the science photometric scale (0 where masked).
    noise : array (H, W) float32
        1-sigma noise of ``diff`` per pixel (0 where masked).
    mask : array (H, W) uint16
        MaskBit bits of ``diff``.
    convolved_image : array (H, W) float32
        The convolved image plus differential background, in the units of the image it is
        matched to (0 where masked).
    convolved : 'reference' | 'science'
        Which input was convolved.
    regions : list of RegionFit
    fwhm_science, fwhm_reference : float
        Median stamp-star FWHM (px).
    spec : BasisSpec
    noise_ratio : float
        Robust standard deviation of diff / noise over unmasked pixels.
    timings : dict
        Wall-clock seconds per stage: stamps, fit, convolution, noise, mask.
    cpu_timings : dict
        Process CPU seconds per stage (all threads).
    n_stars : int
        Stars detected in both images.
    """

    diff: object
    noise: object
    mask: object
    convolved_image: object
    convolved: str
    regions: list[RegionFit]
    fwhm_science: float
    fwhm_reference: float
    spec: BasisSpec
    noise_ratio: float
    n_stars: int
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return sum(r.fit.n_kept for r in self.regions if not r.fallback)

    @property
    def n_stamps(self) -> int:
        return sum(r.n_stamps for r in self.regions if not r.fallback)

    @property
    def mean_chi2(self) -> float:
        vals = [r.fit.mean_chi2 for r in self.regions]
        return float(np.nanmean(vals)) if vals else float("nan")

    @property
    def kernel_sum(self) -> float:
        return float(np.median([r.solution.flux for r in self.regions]))


def region_bounds(shape: tuple[int, int], nregions: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Split an image into ``nx x ny`` near-equal regions ``(y0, y1, x0, x1)``, row by row."""
    h, w = shape
    nx, ny = max(int(nregions[0]), 1), max(int(nregions[1]), 1)
    xe = np.linspace(0, w, nx + 1).round().astype(int)
    ye = np.linspace(0, h, ny + 1).round().astype(int)
    return [(int(ye[j]), int(ye[j + 1]), int(xe[i]), int(xe[i + 1])) for j in range(ny) for i in range(nx)]


def choose_direction(fwhm_science: float, fwhm_reference: float, forced: str = "auto") -> str:
    """'reference' or 'science': the image to convolve (the sharper one unless forced)."""
    if forced in ("reference", "science"):
        return forced
    if forced != "auto":
        raise ValueError(f"convolve must be auto, reference or science, got {forced!r}")
    return "reference" if fwhm_reference <= fwhm_science else "science"


class _Timer:
    """Wall-clock and process CPU seconds per named stage."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                self.c0 = time.process_time()

            def __exit__(self, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.t0
                timer.cpu[name] = timer.cpu.get(name, 0.0) + time.process_time() - self.c0

        return _Ctx()


def _photon_variance(plane: Plane, sky: float, xp, nsigma: float = 2.0, base=None):
    """Photon noise of the sources, ``(data - sky) / EGAIN`` where the source signal exceeds
    ``nsigma`` background sigmas, else 0 (units^2); added to ``base`` when given.

    Counting it only above the noise keeps pure-noise pixels from adding ~0.4 sigma/EGAIN of
    spurious variance, which ``max(data - sky, 0) / EGAIN`` would. Written with in-place
    operations: it runs on full frames.
    """
    out = xp.subtract(plane.data, xp.float32(sky), dtype=xp.float32)
    if not plane.egain:
        out[...] = 0
    else:
        sq = out * out
        drop = sq <= plane.var * xp.float32(nsigma * nsigma)
        del sq
        drop |= out <= 0
        out *= xp.float32(1.0 / plane.egain)
        out[drop] = 0
        del drop
    if base is not None:
        out += base
    return out


def _prepare(plane: Plane, xp) -> Plane:
    """The plane with its mask completed (NONFINITE where the data are not finite, EDGE where the
    weight is 0 without a reason) and the variance 0 wherever the mask is set (the inputs are
    not modified; arrays are copied only when something changes)."""
    mask = plane.mask.astype(xp.uint16, copy=True)
    data = plane.data.astype(xp.float32, copy=False)
    nonfinite = ~xp.isfinite(data)
    if bool(nonfinite.any()):
        mask[nonfinite] |= int(MaskBit.NONFINITE)
        data = xp.where(nonfinite, 0, data).astype(xp.float32)
    del nonfinite
    var = plane.var.astype(xp.float32, copy=False)
    mask[(var <= 0) & (mask == 0)] |= int(MaskBit.EDGE)
    stray = (mask != 0) & (var != 0)
    if bool(stray.any()):
        var = xp.where(stray, 0, var).astype(xp.float32)
    return Plane(data, var, mask, plane.egain, plane.saturate)


#: Mask bits of the convolved image whose pixels may hold any flux (a saturated core): the
#: whole kernel footprint around them is masked.
HARD_BITS = int(MaskBit.SATURATED | MaskBit.NONFINITE)
#: A masked pixel of the convolved image spoils a difference pixel when the light it may have
#: held, spread by the kernel, exceeds this fraction of the difference's noise there.
GROW_NOISE_FRACTION = 0.2


def _max_filter(a, half: int, xp):
    """Maximum over a (2 half + 1)^2 box (separable, by shifted slices; the box is cut at the
    edges)."""
    out = a
    for axis in (0, 1):
        src = out
        out = src.copy()
        n = src.shape[axis]
        for sh in range(1, min(half, n - 1) + 1):
            lo = [slice(None), slice(None)]
            hi = [slice(None), slice(None)]
            lo[axis], hi[axis] = slice(0, n - sh), slice(sh, n)
            lo, hi = tuple(lo), tuple(hi)
            xp.maximum(out[hi], src[lo], out=out[hi])
            xp.maximum(out[lo], src[hi], out=out[lo])
    return out


def _grown_mask(tgt: Plane, src: Plane, regions: list[RegionFit], var, sky_t: float, sky_i: float, direction: str,
                fwhm_t: float, fwhm_i: float, r: int, xp, fft, tile: int):
    """Difference pixels spoilt by masked pixels of the convolved image.

    A masked pixel of the convolved image (filled with its sky) lacks whatever light it held,
    and the kernel spreads that lack over its footprint. Around saturated or non-finite
    pixels (any flux) the whole footprint is masked. Elsewhere (cosmic rays, bad columns, hot
    pixels, trails, the edge of the data) the light is estimated, on the convolved image's
    scale, as the larger of: the other image's significant light (beyond 2 sigma) at the same
    place (divided by the kernel sum, times (FWHM_t / FWHM_i)^2 when the convolved image is
    the sharper), and the convolved image's own significant light within 2 px (a source
    partly on the masked pixel, present in that image only: a transient when the science is
    convolved). Convolved with ``|K|``, it masks the difference pixels where it exceeds
    :data:`GROW_NOISE_FRACTION` of their noise. Masked pixels on blank sky thus spoil nothing.
    Where both images are masked the light is unknown and the whole footprint is masked.
    """
    smask = src.mask != 0
    hard = ((src.mask & HARD_BITS) != 0) | (smask & (tgt.mask != 0))
    grown = dilate(hard, r, xp)
    soft = smask & ~hard
    if not bool(soft.any()):
        return grown
    peak = max(1.0, (fwhm_t / max(fwhm_i, 1e-3)) ** 2)
    sig = xp.sqrt(xp.clip(tgt.var, 0, None))
    light_t = xp.clip(xp.abs(tgt.data - xp.float32(sky_t)) - 2 * sig, 0, None).astype(xp.float32)
    sig = xp.sqrt(xp.clip(src.var, 0, None))
    own = xp.where(smask, 0, xp.clip(xp.abs(src.data - xp.float32(sky_i)) - 2 * sig, 0, None)).astype(xp.float32)
    del sig
    own = _max_filter(own, 2, xp)
    for reg in regions:
        y0, y1, x0, x1 = reg.bounds
        sol = reg.solution
        k = xp.abs(xp.asarray(sol.kernel_at(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)), dtype=xp.float32))
        flux = abs(float(sol.flux)) or 1.0
        light = xp.where(soft, xp.maximum(light_t * xp.float32(peak / flux), own), 0).astype(xp.float32)
        # spread by |K| into the difference (target units)
        spread = convolve_tilewise(light, reg.bounds, k, xp, fft, tile=tile)
        if direction == "science":
            spread = spread * xp.float32(1.0 / flux)      # the difference is on the science scale
        noise = xp.sqrt(xp.clip(var[y0:y1, x0:x1], 0, None))
        grown[y0:y1, x0:x1] |= spread > GROW_NOISE_FRACTION * noise
    return grown


def _stamp_data(tgt: Plane, src: Plane, stars: st.Stars, idx, rss: int, r: int, xp) -> StampData:
    ys, xs = stars.y[idx], stars.x[idx]
    return StampData(xs=xs, ys=ys,
                     target=st.gather_stamps(tgt.data, ys, xs, rss, xp),
                     var_target=st.gather_stamps(tgt.var, ys, xs, rss, xp),
                     source=st.gather_stamps(src.data, ys, xs, rss + r, xp),
                     var_source=st.gather_stamps(src.var, ys, xs, rss + r, xp),
                     bad=st.stamp_bad(tgt.mask, src.mask, ys, xs, rss, r, xp))


def subtract(science: Plane, reference: Plane, xp, params: EngineParams | None = None) -> SubtractionResult:
    """PSF-matched difference of ``science`` minus ``reference`` (same grid).

    Parameters
    ----------
    science, reference : Plane
        Inputs on the same pixel grid (the reference already reprojected).
    xp : module
        NumPy or CuPy (:func:`gppy.xp.get_xp`).
    params : EngineParams, optional

    Returns
    -------
    SubtractionResult

    Raises
    ------
    EngineError
        No stars common to both images, or no region could be fitted.
    """
    with _single_thread_blas(xp):
        return _subtract(science, reference, xp, params or EngineParams())


def _single_thread_blas(xp):
    """The fit's matrix products are many small ones: a BLAS thread pool only adds overhead
    (and stalls badly on a busy machine). FFTs keep their own workers."""
    if backend_name(xp) == "numpy":
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1, user_api="blas")
    return contextlib.nullcontext()


def _subtract(science: Plane, reference: Plane, xp, p: EngineParams) -> SubtractionResult:
    fft = fft_for(xp)
    timer = _Timer()
    shape = tuple(science.data.shape)
    if tuple(reference.data.shape) != shape:
        raise EngineError(f"science {shape} and reference {tuple(reference.data.shape)} differ in shape")
    H, W = shape

    S, R = _prepare(science, xp), _prepare(reference, xp)
    sci_mask, ref_mask = S.mask, R.mask

    with timer("stamps"):
        stars = st.find_stars(S.data, S.var, S.mask, R.data, R.var, R.mask, xp, detect_snr=p.detect_snr,
                              saturate_sci=S.saturate, saturate_ref=R.saturate,
                              sat_fraction=p.sat_fraction)
        if len(stars) < 3:
            raise EngineError(f"only {len(stars)} stars detected in both images")
        fwhm_s = float(np.median(stars.fwhm_s))
        fwhm_r = float(np.median(stars.fwhm_r))
        direction = choose_direction(fwhm_s, fwhm_r, p.convolve)
        tgt, src = (S, R) if direction == "reference" else (R, S)
        # the image that is convolved must be neutral where masked: its sky level
        sky_fill, _ = st.sky_level(src.data, src.mask, xp)
        src = Plane(xp.where(src.mask == 0, src.data, xp.float32(sky_fill)).astype(xp.float32), src.var, src.mask,
                    src.egain, src.saturate)
        fw_t = stars.fwhm_s if direction == "reference" else stars.fwhm_r
        fw_i = stars.fwhm_r if direction == "reference" else stars.fwhm_s
        spec = design_basis(float(np.median(fw_i)), float(np.median(fw_t)), degrees=p.degrees,
                            width_ratios=p.width_ratios, half_width=p.half_width)
        spec = BasisSpec(max(spec.half_width, int(math.ceil(1.5 * np.percentile(fw_t, 90)))),
                         spec.sigmas, spec.degrees) if p.half_width is None else spec
        r = spec.half_width
        rss = p.stamp_half_width or max(r + 4, int(math.ceil(3.0 * np.median(fw_t))))
        basis = gaussian_hermite_basis(spec)
        # stamps may hold masked pixels (left out of the fit), but not at the star's core
        ok = st.usable_with_masks(stars, tgt.mask, src.mask, rss, r, shape, xp,
                                  core_radius=max(2.0, 1.5 * float(np.median(fw_t))))
        good = stars.take(np.nonzero(ok)[0])
        if len(good) < 3:
            raise EngineError(f"only {len(good)} usable stamp stars (of {len(stars)} in both images)")
        flux_t = good.flux_s if direction == "reference" else good.flux_r
        flux_i = good.flux_r if direction == "reference" else good.flux_s
        flux_guess = float(np.median(flux_t / flux_i))
        sky_t, _ = st.sky_level(tgt.data, tgt.mask, xp)
        sky_i, _ = st.sky_level(src.data, src.mask, xp)
    log.info("stamps: %d stars in both images, %d usable; FWHM sci %.2f ref %.2f px; convolving %s; "
             "kernel half-width %d, stamp half-width %d, %d basis functions", len(stars), len(good),
             fwhm_s, fwhm_r, direction, r, rss, basis.shape[0])

    fit_kw = dict(kernel_order=p.kernel_order, bg_order=p.bg_order,
                  egain_target=tgt.egain if p.photon_noise else None,
                  egain_source=src.egain if p.photon_noise else None,
                  sky_target=sky_t, sky_source=sky_i, flux_guess=flux_guess, clip=p.clip, max_iter=p.max_iter)
    regions: list[RegionFit] = []
    global_fit: RegionFit | None = None
    with timer("fit"):
        for bounds in region_bounds(shape, p.nregions):
            idx = st.pick_stamps(good, bounds, p.stamp_grid, p.per_cell)
            try:
                if idx.size < p.min_stamps:
                    raise FitError(f"only {idx.size} stamps in region {bounds} (need {p.min_stamps})")
                fit = fit_kernel(_stamp_data(tgt, src, good, idx, rss, r, xp), basis, bounds, xp, fft,
                                 min_stamps=min(p.min_stamps, 4), **fit_kw)
                regions.append(RegionFit(bounds, fit, int(idx.size)))
            except FitError as exc:
                log.warning("region %s: %s; using the whole-image solution", bounds, exc)
                if global_fit is None:
                    full = (0, H, 0, W)
                    gidx = st.pick_stamps(good, full, p.stamp_grid, p.per_cell)
                    try:
                        gfit = fit_kernel(_stamp_data(tgt, src, good, gidx, rss, r, xp), basis, full, xp, fft,
                                          min_stamps=4, **fit_kw)
                    except FitError as exc2:
                        raise EngineError(f"no kernel solution: {exc2}") from exc2
                    global_fit = RegionFit(full, gfit, int(gidx.size), fallback=True)
                regions.append(RegionFit(bounds, global_fit.fit, global_fit.n_stamps, fallback=True))

    diff = xp.zeros(shape, dtype=xp.float32)
    conv_img = xp.zeros(shape, dtype=xp.float32)
    var = xp.zeros(shape, dtype=xp.float32)
    with timer("convolution"):
        for reg in regions:
            y0, y1, x0, x1 = reg.bounds
            sol = reg.solution
            pb = sol.bounds
            c = convolve_polynomial(src.data, reg.bounds, sol.term_kernels(), sol.terms, xp, fft, tile=p.tile,
                                    poly_bounds=pb, uv_box=sol.uv_box)
            c += polynomial_image(sol.bg_coeffs, sol.bg_terms, reg.bounds, xp, poly_bounds=pb)
            conv_img[y0:y1, x0:x1] = c
            t = tgt.data[y0:y1, x0:x1]
            diff[y0:y1, x0:x1] = (t - c) if direction == "reference" else (c - t) / sol.flux
    with timer("noise"):
        var_i = _photon_variance(src, sky_i, xp, base=src.var) if p.photon_noise else src.var
        for reg in regions:
            y0, y1, x0, x1 = reg.bounds
            sol = reg.solution
            kc = sol.kernel_at(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)) ** 2
            cv = convolve_tilewise(var_i, reg.bounds, kc / kc.sum(), xp, fft, tile=p.tile,
                                   scale_at=lambda xc, yc, s=sol: float((s.kernel_at(xc, yc) ** 2).sum()))
            region_t = Plane(tgt.data[y0:y1, x0:x1], tgt.var[y0:y1, x0:x1], None, tgt.egain)
            cv += _photon_variance(region_t, sky_t, xp, base=region_t.var) if p.photon_noise else region_t.var
            if direction == "science":
                cv *= xp.float32(1.0 / sol.flux ** 2)
            var[y0:y1, x0:x1] = cv
        del var_i
    with timer("mask"):
        out = sci_mask.copy()
        out[ref_mask != 0] |= int(MaskBit.REFERENCE)
        if p.mask_growth == "light":
            grown = _grown_mask(tgt, src, regions, var, sky_t, sky_i, direction, float(np.median(fw_t)),
                                float(np.median(fw_i)), r, xp, fft, p.tile)
        else:
            grown = dilate(src.mask != 0, r, xp)
        grown &= out == 0
        out[grown] |= int(MaskBit.GROWN)
        del grown
        for sl in ((slice(0, r), slice(None)), (slice(H - r, H), slice(None)), (slice(None), slice(0, r)),
                   (slice(None), slice(W - r, W))):
            out[sl] |= int(MaskBit.EDGE)
        bad = out != 0
        bad |= ~(var > 0)
        var[bad] = 0
        noise = xp.sqrt(var, out=var)             # in place: the variance is not needed any more
        del var
        diff[bad] = 0
        conv_img[bad] = 0
        ok3 = ~bad[::3, ::3]
        sub = diff[::3, ::3][ok3] / noise[::3, ::3][ok3]
        if sub.size > 100:
            med = float(xp.median(sub))
            ratio = 1.4826 * float(xp.median(xp.abs(sub - med)))
        else:
            ratio = float("nan")
    res = SubtractionResult(diff=diff, noise=noise, mask=out, convolved_image=conv_img, convolved=direction,
                            regions=regions, fwhm_science=fwhm_s, fwhm_reference=fwhm_r, spec=spec,
                            noise_ratio=ratio, n_stars=len(stars), timings=dict(timer.t),
                            cpu_timings=dict(timer.cpu))
    log.info("subtraction: %d/%d stamps kept, chi2 %.2f, kernel sum %.4f, noise ratio %.3f, %s",
             res.n_kept, res.n_stamps, res.mean_chi2, res.kernel_sum, ratio,
             ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items()))
    return res


def to_host_result(res: SubtractionResult) -> SubtractionResult:
    """The same result with NumPy image arrays (for writing)."""
    res.diff = to_host(res.diff)
    res.noise = to_host(res.noise)
    res.mask = to_host(res.mask)
    res.convolved_image = to_host(res.convolved_image)
    return res
