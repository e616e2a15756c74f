"""Kernel fit: normal equations over the stamps of a region, with iterative stamp rejection.

Model of a target stamp pixel p of stamp s (centre (x_s, y_s)):

    T_s(p) = a0 (B0 * I_s)(p) + sum_ij c_ij P_j(x_s, y_s) (B_i * I_s)(p) + sum_k b_k P_k(x_p, y_p)

where ``I_s`` is the stamp of the image being convolved, ``*`` is convolution, the kernel's
spatial polynomial is evaluated at the stamp centre (as HOTPANTS does) and the background's at
every pixel. Each stamp contributes small matrices (basis x basis, basis x background) once;
the region's normal matrix is their polynomial-weighted sum, so rejecting a stamp is a cheap
re-sum. Pixel weights are inverse variances: first from the two images' background noise and
the target's photon noise, then, once a kernel is known, with the convolved image's variance
propagated through that kernel (``K^2 * var``). Iterations then drop stamps whose reduced chi^2
is more than ``clip`` robust standard deviations above the median (variable stars, cosmic rays,
blends); every stamp is re-judged against each new solution, so stamps dropped while a bad one
still distorted the kernel come back. It stops when the set no longer changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gppy.xp import to_host

from .kernel import KernelSolution, normalised_coords, spatial_terms


class FitError(RuntimeError):
    """The kernel cannot be fitted (too few usable stamps, singular system)."""


@dataclass
class StampData:
    """Stamps of one region.

    Attributes
    ----------
    xs, ys : host int arrays (n,)
        Stamp centres (px, full image).
    target : array (n, S, S)
        Target-image stamps (S = 2*half_stamp + 1), target units.
    var_target : array (n, S, S)
        Background variance of the target (units^2).
    source : array (n, S+2r, S+2r)
        Stamps of the image to convolve, padded by the kernel half-width r.
    var_source : array (n, S+2r, S+2r)
        Background variance of the image to convolve (its units^2).
    bad : bool array (n, S, S), optional
        Target pixels left out of the fit (masked, or reached by a masked source pixel).
    """

    xs: np.ndarray
    ys: np.ndarray
    target: object
    var_target: object
    source: object
    var_source: object
    bad: object = None

    def __len__(self) -> int:
        return int(self.xs.size)


@dataclass
class FitResult:
    """Outcome of :func:`fit_kernel`.

    Attributes
    ----------
    solution : KernelSolution
    kept : host bool array (n,)
        Stamps used in the final solution.
    chi2 : host float array (n,)
        Reduced chi^2 of every stamp against the final solution.
    n_iter : int
        Solve iterations.
    """

    solution: KernelSolution
    kept: np.ndarray
    chi2: np.ndarray
    n_iter: int

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def mean_chi2(self) -> float:
        return float(np.mean(self.chi2[self.kept])) if self.kept.any() else float("nan")


def embed_kernels(kernels, size: int, xp):
    """Place (m, k, k) kernels, centred, into (m, size, size) arrays with the centre at [0, 0].

    The result's FFT is the kernel's transfer function for circular convolution
    ``out[y] = sum_u K[u] in[y - u]``.
    """
    m, k, _ = kernels.shape
    r = (k - 1) // 2
    out = xp.zeros((m, size, size), dtype=kernels.dtype)
    out[:, :k, :k] = kernels
    return xp.roll(out, shift=(-r, -r), axis=(1, 2))


def _fast(n: int) -> int:
    from .convolve import next_fast_len

    return next_fast_len(n)


def convolve_valid(stack, kernels, fft, xp):
    """Convolve every padded stamp with every kernel and keep the fully overlapped part.

    Parameters
    ----------
    stack : array (n, N, N)
        Padded stamps.
    kernels : array (m, k, k)
        Kernels (k = 2r+1 <= N).

    Returns
    -------
    array (n, m, N-2r, N-2r), float32 (FFTs in single precision, relative error ~1e-7)
    """
    n, size, _ = stack.shape
    k = kernels.shape[-1]
    r = (k - 1) // 2
    s = size - 2 * r
    L = _fast(size)
    fk = fft.rfft2(embed_kernels(xp.asarray(kernels, dtype=xp.float32), L, xp))
    fs = fft.rfft2(xp.asarray(stack, dtype=xp.float32), s=(L, L))
    out = fft.irfft2(fs[:, None] * fk[None], s=(L, L))
    return out[:, :, r:r + s, r:r + s]


def convolve_each(stack, kernels, fft, xp):
    """Convolve stamp i of ``stack`` (n, N, N) with kernel i of ``kernels`` (n, k, k); valid part."""
    n, size, _ = stack.shape
    k = kernels.shape[-1]
    r = (k - 1) // 2
    s = size - 2 * r
    L = _fast(size)
    fk = fft.rfft2(embed_kernels(xp.asarray(kernels, dtype=xp.float32), L, xp))
    out = fft.irfft2(fft.rfft2(xp.asarray(stack, dtype=xp.float32), s=(L, L)) * fk, s=(L, L))
    return out[:, r:r + s, r:r + s]


def basis_convolutions(source, basis, fft, xp, chunk: int = 24):
    """Every padded source stamp convolved with every basis image.

    Returns
    -------
    array (n, n_basis, S*S), float64
    """
    parts = []
    for i in range(0, source.shape[0], chunk):
        c = convolve_valid(source[i:i + chunk], basis, fft, xp)
        parts.append(c.reshape(c.shape[0], c.shape[1], -1).astype(xp.float64))
    return xp.concatenate(parts, axis=0)


def _solve_normal(M, rhs, xp):
    d = xp.sqrt(xp.abs(xp.diag(M)))
    d = xp.where(d > 0, d, 1.0)
    Mn = M / d[:, None] / d[None, :]
    Mn = Mn + 1e-10 * xp.eye(M.shape[0], dtype=M.dtype)
    y = xp.linalg.solve(Mn, rhs / d)
    return y / d


def max_order_for(n_stamps: int, requested: int, per_term: int = 3) -> int:
    """Highest spatial order <= ``requested`` whose number of terms times ``per_term`` does not
    exceed the number of stamps (at least 0)."""
    order = requested
    while order > 0 and n_stamps < per_term * len(spatial_terms(order)):
        order -= 1
    return order


def fit_kernel(stamps: StampData, basis: np.ndarray, bounds: tuple[int, int, int, int], xp, fft, *,
               kernel_order: int = 2, bg_order: int = 1, egain_target: float | None = None,
               egain_source: float | None = None, sky_target: float = 0.0, sky_source: float = 0.0,
               flux_guess: float = 1.0, clip: float = 3.0, max_iter: int = 6,
               min_stamps: int = 4) -> FitResult:
    """Fit the spatially varying kernel and differential background of one region.

    Parameters
    ----------
    stamps : StampData
        The region's stamps (target and padded source cut-outs with variances).
    basis : ndarray (n_basis, k, k)
        From :func:`gppy_subtract.kernel.gaussian_hermite_basis`.
    bounds : (y0, y1, x0, x1)
        The region (normalises the spatial polynomials).
    kernel_order, bg_order : int
        Spatial orders of the kernel shape and of the background (HOTPANTS ``-ko``, ``-bgo``);
        the kernel order is lowered when there are fewer than 3 stamps per spatial term.
    egain_target, egain_source : float, optional
        e-/unit of the two images, for photon noise; None = no photon-noise term.
    sky_target, sky_source : float
        Sky levels (image units) above which photon noise is counted.
    flux_guess : float
        Rough kernel sum (target flux / source flux) for the first weights.
    clip : float
        Rejection threshold in robust standard deviations of the stamps' reduced chi^2.
    max_iter : int
        Maximum number of solves.
    min_stamps : int
        Rejection stops before fewer stamps than this remain.

    Returns
    -------
    FitResult

    Raises
    ------
    FitError
        Fewer than ``min_stamps`` stamps, or a singular system.
    """
    n = len(stamps)
    if n < min_stamps:
        raise FitError(f"only {n} usable stamps in region {bounds} (need {min_stamps})")
    k = basis.shape[-1]
    r = (k - 1) // 2
    nb = basis.shape[0]
    order = max_order_for(n, kernel_order)
    terms = spatial_terms(order)
    bg_terms = spatial_terms(max_order_for(n, bg_order, per_term=2))
    nt, nbg = len(terms), len(bg_terms)

    tgt = xp.asarray(stamps.target, dtype=xp.float64)
    s = tgt.shape[-1]
    npix = s * s
    t = tgt.reshape(n, npix)
    src = xp.asarray(stamps.source, dtype=xp.float64)
    vt = xp.asarray(stamps.var_target, dtype=xp.float64).reshape(n, npix)
    vs_full = xp.asarray(stamps.var_source, dtype=xp.float64)
    if egain_source:
        sig = src - sky_source
        vs_full = vs_full + xp.where((sig > 0) & (sig * sig > 4.0 * vs_full), sig, 0.0) / egain_source
    vs_core = vs_full[:, r:r + s, r:r + s].reshape(n, npix)
    # photon noise of the target's stars. Taken from the data only where they exceed 2 sigma:
    # a weight that grows with the pixel's own noise (max(t - sky, 0)) would bias the fitted
    # background low by ~sigma^2 / (4 EGAIN sigma) ... i.e. tenths of a count; from the second
    # pass on it comes from the (independent) convolved model instead.
    if egain_target:
        sig_t = t - sky_target
        poisson_t = xp.where((sig_t > 0) & (sig_t * sig_t > 4.0 * vt), sig_t, 0.0) / egain_target
    else:
        poisson_t = 0.0

    C = basis_convolutions(src, basis, fft, xp)  # (n, nb, npix)

    u_c, v_c = normalised_coords(stamps.xs.astype(float), stamps.ys.astype(float), bounds)
    P = xp.asarray(np.stack([u_c ** a * v_c ** b for a, b in terms], axis=1))  # (n, nt)
    off = np.arange(s) - (s - 1) // 2
    px = np.broadcast_to(stamps.xs[:, None, None] + off[None, None, :], (n, s, s))
    py = np.broadcast_to(stamps.ys[:, None, None] + off[None, :, None], (n, s, s))
    u_p, v_p = normalised_coords(px.astype(float), py.astype(float), bounds)
    Bd = xp.asarray(np.stack([(u_p ** a * v_p ** b).reshape(n, npix) for a, b in bg_terms], axis=1))

    m = (nb - 1) * nt
    npar = 1 + m + nbg
    basis_x = xp.asarray(basis, dtype=xp.float64)

    bad = None if stamps.bad is None else xp.asarray(stamps.bad).reshape(n, npix)

    def stamp_products(var):
        w = xp.where(var > 0, 1.0 / xp.where(var > 0, var, 1.0), 0.0)
        if bad is not None:
            w = xp.where(bad, 0.0, w)
        Cw = C * w[:, None, :]
        Bw = Bd * w[:, None, :]
        return (w, xp.matmul(Cw, xp.swapaxes(C, 1, 2)),       # Q (n, nb, nb)
                xp.matmul(Cw, xp.swapaxes(Bd, 1, 2)),         # R (n, nb, nbg)
                xp.matmul(Bw, xp.swapaxes(Bd, 1, 2)),         # G (n, nbg, nbg)
                xp.matmul(Cw, t[:, :, None])[:, :, 0],        # q (n, nb)
                xp.matmul(Bw, t[:, :, None])[:, :, 0])        # g (n, nbg)

    def solve(prod, kept):
        _, Q, R, G, q, g = prod
        kd = xp.asarray(kept.astype(np.float64))
        Pk = P * kd[:, None]
        PP = (Pk[:, :, None] * P[:, None, :]).reshape(n, nt * nt)
        M = xp.zeros((npar, npar), dtype=xp.float64)
        rhs = xp.zeros(npar, dtype=xp.float64)
        M[0, 0] = (Q[:, 0, 0] * kd).sum()
        M[0, 1:1 + m] = (Q[:, 0, 1:].T @ Pk).reshape(m)
        M1 = (Q[:, 1:, 1:].reshape(n, -1).T @ PP).reshape(nb - 1, nb - 1, nt, nt)
        M[1:1 + m, 1:1 + m] = M1.transpose(0, 2, 1, 3).reshape(m, m)
        M[0, 1 + m:] = (R[:, 0, :] * kd[:, None]).sum(axis=0)
        M[1:1 + m, 1 + m:] = xp.einsum("sik,sj->ijk", R[:, 1:, :], Pk).reshape(m, nbg)
        M[1 + m:, 1 + m:] = (G * kd[:, None, None]).sum(axis=0)
        M = xp.triu(M) + xp.triu(M, 1).T
        rhs[0] = (q[:, 0] * kd).sum()
        rhs[1:1 + m] = (q[:, 1:].T @ Pk).reshape(m)
        rhs[1 + m:] = (g * kd[:, None]).sum(axis=0)
        theta = _solve_normal(M, rhs, xp)
        if not bool(xp.all(xp.isfinite(theta))):
            raise FitError(f"singular kernel system in region {bounds}")
        return theta

    def stamp_kernels(theta):
        cij = theta[1:1 + m].reshape(nb - 1, nt)
        kj = xp.tensordot(cij.T, basis_x[1:], axes=1)                      # (nt, k, k)
        kj[0] = kj[0] + theta[0] * basis_x[0]
        return xp.tensordot(P, kj, axes=1)                                  # (n, k, k)

    def residual_chi2(theta, w):
        cij = theta[1:1 + m].reshape(nb - 1, nt)
        a = xp.concatenate([xp.full((n, 1), 1.0) * theta[0], P @ cij.T], axis=1)  # (n, nb)
        model = xp.matmul(a[:, None, :], C)[:, 0, :] + theta[1 + m:] @ Bd
        valid = (w > 0).sum(axis=1)
        chi = ((t - model) ** 2 * w).sum(axis=1) / xp.maximum(valid, 1)
        return to_host(chi)

    # first pass: approximate weights (source variance scaled by the flux ratio)
    kept = np.ones(n, bool)
    prod = stamp_products(vt + flux_guess ** 2 * vs_core + poisson_t)
    theta = solve(prod, kept)
    # final weights: source variance propagated through the fitted kernel at each stamp
    ks = stamp_kernels(theta)
    if egain_target:
        cij = theta[1:1 + m].reshape(nb - 1, nt)
        a = xp.concatenate([xp.full((n, 1), 1.0) * theta[0], P @ cij.T], axis=1)
        conv_src = xp.matmul(a[:, None, :], C)[:, 0, :] - theta[0] * sky_source
        poisson_t = xp.maximum(conv_src, 0.0) / egain_target
    var = vt + convolve_each(vs_full, ks * ks, fft, xp).reshape(n, npix).astype(xp.float64) + poisson_t
    prod = stamp_products(var)
    theta = solve(prod, kept)
    n_iter = 2
    chi2 = residual_chi2(theta, prod[0])
    finite = np.isfinite(chi2)
    for _ in range(max_iter):
        good = kept & finite
        med = float(np.median(chi2[good]))
        sig = 1.4826 * float(np.median(np.abs(chi2[good] - med)))
        # the MAD of a shrinking set shrinks: never clip below the chi^2 scatter expected from
        # noise alone, sqrt(2 / n_pixels) per stamp
        limit = med + clip * max(sig, np.sqrt(2.0 / npix) * max(med, 1.0))
        # every stamp is judged against the current solution, so a stamp dropped while a bad
        # one (a variable star) still distorted the kernel comes back once that one is gone
        new_kept = finite & (chi2 <= limit)
        if np.array_equal(new_kept, kept) or int(new_kept.sum()) < min_stamps:
            break
        kept = new_kept
        theta = solve(prod, kept)
        n_iter += 1
        chi2 = residual_chi2(theta, prod[0])
        finite = np.isfinite(chi2)
    theta_h = to_host(theta)
    sol = KernelSolution(basis=np.asarray(basis), terms=terms, flux=float(theta_h[0]),
                         coeffs=theta_h[1:1 + m].reshape(nb - 1, nt), bg_terms=bg_terms,
                         bg_coeffs=theta_h[1 + m:], bounds=bounds,
                         uv_box=(float(u_c[kept].min()), float(u_c[kept].max()),
                                 float(v_c[kept].min()), float(v_c[kept].max())))
    return FitResult(solution=sol, kept=kept, chi2=chi2, n_iter=n_iter)
