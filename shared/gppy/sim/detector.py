"""Detector model: bias structure, dark current and hot pixels, flat field, bad columns, and
the conversion of an expected signal into a raw 16-bit frame.

Units: the *flat-fielded* signal is in ADU (what a perfectly calibrated frame shows);
the detector multiplies it by the flat (the pixel response), converts to electrons with the
gain, adds dark current, draws Poisson noise, adds cosmic-ray charge, converts back to ADU,
adds the bias and read noise, and clips to the 16-bit range.

Noise: where a pixel expects fewer than ``POISSON_EXACT_BELOW`` electrons the photo-electrons
are exact Poisson draws (then read noise is added); at and above it, photo-electrons plus read
noise are drawn together as one normal deviate with the Cornish-Fisher skew term, so that the
mean, variance and third cumulant are those of ``Poisson(lam) + N(0, RN^2)`` (what is left is
in the fourth cumulant, ``lam / V^2`` with ``V = lam + RN^2``: below 0.02 at the threshold, and
the discreteness of the electrons, which the 3 e- read noise blurs). Everything is computed in
float32 in bands of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gppy.sim.instrument import ADC_MAX, BIAS_LEVEL, DARK_CURRENT_E, EGAIN, READ_NOISE_E

POISSON_EXACT_BELOW = 20.0     # e-: exact Poisson below, skew-corrected normal at and above
BAND_ROWS = 256                # rows per band (a float32 band of a full frame is ~10 MB)
MASK_BADCOL, MASK_HOT = 8, 16  # bits of the truth masks (see night.py)


@dataclass
class Physics:
    """Switches for every simulated effect (all on by default)."""

    bias_structure: bool = True
    dark_current: bool = True
    hot_pixels: bool = True
    vignetting: bool = True
    dust: bool = True
    prnu: bool = True
    sky: bool = True
    noise: bool = True
    stars: bool = True
    seeing_variation: bool = True
    distortion: bool = True
    pointing_error: bool = True
    rotation: bool = True
    saturation: bool = True
    cosmic_rays: bool = True
    satellite_trail: bool = True
    bad_columns: bool = True
    transients: bool = True

    @classmethod
    def none(cls) -> Physics:
        """Everything off (a clean, noiseless frame of stars on a flat bias)."""
        return cls(**{k: False for k in cls.__dataclass_fields__})


@dataclass
class BadColumn:
    x: int                 # 0-based column
    y0: int                # first affected row (0-based)
    y1: int                # last affected row + 1
    kind: str              # "dead" (low response), "hot" (extra dark current), "noisy" (extra read noise)
    value: float           # response factor, e-/s, or extra noise in ADU

    def to_dict(self) -> dict:
        return {"x_0based": self.x, "y0_0based": self.y0, "y1_0based_exclusive": self.y1,
                "kind": self.kind, "value": self.value}


@dataclass
class Detector:
    """Fixed-pattern properties of one camera (the same for every night of a unit)."""

    shape: tuple[int, int]                 # (ny, nx)
    bias: np.ndarray                       # ADU, noiseless bias image (without per-frame offset)
    dark: np.ndarray                       # e-/s, dark current incl. hot pixels and hot columns
    vignetting: np.ndarray                 # response common to every filter
    prnu: np.ndarray
    dust_common: list[tuple[float, float, float, float]]
    dust_filter: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    bad_columns: list[BadColumn] = field(default_factory=list)
    gain: float = EGAIN
    read_noise_e: float = READ_NOISE_E
    seed: int = 0
    physics: Physics = field(default_factory=Physics)
    _flats: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _fixed_mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def read_noise_adu(self) -> float:
        return self.read_noise_e / self.gain

    @property
    def hot_pixel_mask(self) -> np.ndarray:
        return self.dark > 0.5

    def fixed_mask(self) -> np.ndarray:
        """Truth-mask bits that are the same in every frame (uint8): bad columns (8) and hot
        pixels (16, dark current > 0.5 e-/s). Built once; do not modify it."""
        if self._fixed_mask is None:
            m = np.zeros(self.shape, np.uint8)
            for b in self.bad_columns:
                m[b.y0:b.y1, b.x] |= MASK_BADCOL
            m[self.hot_pixel_mask] |= MASK_HOT
            self._fixed_mask = m
        return self._fixed_mask

    def flat(self, filt: str) -> np.ndarray:
        """True response of filter ``filt``, normalised to a median of 1 (float32)."""
        if filt not in self._flats:
            resp = np.empty(self.shape, np.float32)
            np.multiply(self.vignetting, self.prnu, out=resp)
            if self.physics.dust:
                if filt not in self.dust_filter:
                    rng = np.random.default_rng([self.seed, 77, _stable_hash(filt)])
                    self.dust_filter[filt] = _dust_rings(self.shape, max(1, len(self.dust_common) // 2), rng)
                _apply_dust(resp, self.dust_common + self.dust_filter[filt])
            if self.physics.bad_columns:
                for bc in self.bad_columns:
                    if bc.kind == "dead":
                        resp[bc.y0:bc.y1, bc.x] *= np.float32(bc.value)
            resp /= np.float32(np.median(resp))
            self._flats[filt] = resp
        return self._flats[filt]

    def to_dict(self) -> dict:
        return {"gain_e_per_adu": self.gain, "read_noise_e": self.read_noise_e,
                "read_noise_adu": self.read_noise_adu, "bias_level_adu": float(np.median(self.bias)),
                "dark_current_median_e_per_s": float(np.median(self.dark)),
                "n_hot_pixels": int(self.hot_pixel_mask.sum()),
                "bad_columns": [b.to_dict() for b in self.bad_columns],
                "dust_rings_common": [list(map(float, d)) for d in self.dust_common],
                "dust_rings_filter": {k: [list(map(float, d)) for d in v] for k, v in self.dust_filter.items()},
                "adc_max_adu": ADC_MAX}


def _stable_hash(text: str) -> int:
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") % (2 ** 31)


def _dust_rings(shape: tuple[int, int], n: int, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    ny, nx = shape
    out = []
    for _ in range(n):
        out.append((float(rng.uniform(40, nx - 40)), float(rng.uniform(40, ny - 40)),
                    float(rng.uniform(12, 38)), float(rng.uniform(0.01, 0.045))))
    return out


def _apply_dust(img: np.ndarray, rings: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Multiply ``img`` in place by dust shadows: an annulus (donut) of radius R, depth d at
    each (x, y), and a shallower disc inside it."""
    shape = img.shape
    for (x0, y0, r, depth) in rings:
        h = int(r * 1.6) + 3
        xs = slice(max(0, int(x0) - h), min(shape[1], int(x0) + h + 1))
        ys = slice(max(0, int(y0) - h), min(shape[0], int(y0) + h + 1))
        yy, xx = np.mgrid[ys, xs]
        rr = np.hypot(xx - x0, yy - y0)
        w = 0.18 * r
        shadow = depth * (np.exp(-0.5 * ((rr - r) / w) ** 2) + 0.45 * (rr < r))
        img[ys, xs] *= (1.0 - shadow).astype(np.float32)
    return img


def _dust_image(shape: tuple[int, int], rings: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Multiplicative dust shadows: a float32 image of ``shape``, 1 away from the rings."""
    return _apply_dust(np.ones(shape, np.float32), rings)


def make_detector(shape: tuple[int, int], seed: int, physics: Physics | None = None) -> Detector:
    """Build the fixed-pattern detector of a unit (deterministic for ``seed``; float32 images
    computed in bands of rows)."""
    physics = physics or Physics()
    ny, nx = shape
    rng = np.random.default_rng([seed, 1])
    bands = [(r0, min(ny, r0 + BAND_ROWS)) for r0 in range(0, ny, BAND_ROWS)]
    # bias: level + column structure + a gentle row gradient
    bias = np.full(shape, BIAS_LEVEL, np.float32)
    if physics.bias_structure:
        cols = rng.normal(0.0, 1.5, nx) + 1.2 * np.sin(np.arange(nx) / nx * 6.0)
        cols[rng.integers(0, nx, max(1, nx // 300))] += rng.normal(0, 6.0, max(1, nx // 300))
        rows = np.linspace(-1.0, 1.0, ny) * 1.0
        bias += cols[None, :].astype(np.float32)
        bias += rows[:, None].astype(np.float32)
    # dark current + amplifier glow in one corner + hot pixels
    dark = np.zeros(shape, np.float32)
    if physics.dark_current:
        # glow 0.04 exp(-(x + (ny - 1 - y)) / L) e-/s is separable: an outer product per band
        glow_len = 0.05 * (nx + ny)
        gx = np.exp(-np.arange(nx) / glow_len).astype(np.float32)
        gy = (0.04 * np.exp(-(ny - 1 - np.arange(ny)) / glow_len)).astype(np.float32)
        for r0, r1 in bands:
            np.multiply(gy[r0:r1, None], gx[None, :], out=dark[r0:r1])
        dark += np.float32(DARK_CURRENT_E)
    if physics.hot_pixels:
        nhot = max(5, int(2e-4 * nx * ny))
        hy, hx = rng.integers(0, ny, nhot), rng.integers(0, nx, nhot)
        dark[hy, hx] += np.exp(rng.uniform(np.log(0.6), np.log(60.0), nhot)).astype(np.float32)
    # response: vignetting (centre ~1.06 x median), PRNU
    vig = np.ones(shape, np.float32)
    if physics.vignetting:
        # rho^2 = (x'^2 nx^2 + y'^2 ny^2) / (nx^2 + ny^2), x', y' in -1..1 from the centre
        xx = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) / (nx / 2)
        yy = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) / (ny / 2)
        ax = (xx * xx * nx * nx / (nx * nx + ny * ny)).astype(np.float32)
        ay = (yy * yy * ny * ny / (nx * nx + ny * ny)).astype(np.float32)
        for r0, r1 in bands:
            rho2 = vig[r0:r1]
            np.add(ay[r0:r1, None], ax[None, :], out=rho2)
            t = rho2 * np.float32(0.04)                 # 1 - 0.10 rho2 - 0.04 rho2^2
            t += np.float32(0.10)
            t *= rho2
            np.subtract(np.float32(1.0), t, out=rho2)
    prnu = np.ones(shape, np.float32)
    if physics.prnu:
        # float64 draws band by band: the same stream as one (ny, nx) draw, so the dust rings and
        # bad columns drawn after it are those of every earlier version of the simulator
        for r0, r1 in bands:
            prnu[r0:r1] += rng.normal(0.0, 0.005, (r1 - r0, nx)).astype(np.float32)
    dust = _dust_rings(shape, max(2, int(round(nx * ny / 6e5))), rng) if physics.dust else []
    bad: list[BadColumn] = []
    if physics.bad_columns:
        nbad = max(3, int(round(nx / 800)))
        xs = rng.choice(np.arange(20, nx - 20), nbad, replace=False)
        kinds = ["dead", "hot", "noisy"]
        for i, x in enumerate(sorted(xs)):
            kind = kinds[i % 3]
            y0 = int(rng.integers(0, ny // 2)) if rng.uniform() < 0.5 else 0
            y1 = ny
            value = {"dead": float(rng.uniform(0.05, 0.3)), "hot": float(rng.uniform(3.0, 20.0)),
                     "noisy": float(rng.uniform(40.0, 120.0))}[kind]
            bad.append(BadColumn(int(x), y0, y1, kind, value))
            if kind == "hot":
                dark[y0:y1, x] += value
    return Detector(shape, bias, dark, vig, prnu, dust, {}, bad, seed=seed, physics=physics)


@dataclass
class Exposure:
    """What falls on the detector during one exposure.

    ``signal_adu`` is the flat-fielded signal (sky + sources, ADU; an image, or one value for
    uniform illumination) or None for dark/bias.
    """

    exptime: float
    filt: str | None
    signal_adu: np.ndarray | float | None
    cr_pix: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cr_e: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bias_offset: float = 0.0


def read_out(det: Detector, exp: Exposure, rng: np.random.Generator, band_rows: int = BAND_ROWS) -> np.ndarray:
    """Turn an :class:`Exposure` into raw uint16 ADU (float32, in bands of rows).

    Per pixel: expected electrons ``lam = signal * flat * gain + dark * t``; the electrons
    collected (exact Poisson below ``POISSON_EXACT_BELOW``, skew-corrected normal with the read
    noise folded in above it, see the module docstring) plus cosmic-ray charge, divided by the
    gain, plus bias, frame offset and read noise; rounded and clipped to 0..65535.
    """
    ny, nx = det.shape
    out = np.empty(det.shape, np.uint16)
    ph = det.physics
    flat = det.flat(exp.filt) if (exp.signal_adu is not None and exp.filt) else None
    order = np.argsort(exp.cr_pix, kind="stable")
    cr_pix, cr_e = exp.cr_pix[order], exp.cr_e[order]
    noisy_cols = [b for b in det.bad_columns if b.kind == "noisy"] if ph.bad_columns else []
    use_dark = (ph.dark_current or ph.hot_pixels or ph.bad_columns) and exp.exptime > 0
    f32 = np.float32
    gain, inv_gain, t_exp = f32(det.gain), f32(1.0 / det.gain), f32(exp.exptime)
    rn_e, rn2 = f32(det.read_noise_e), f32(det.read_noise_e ** 2)
    for r0 in range(0, ny, band_rows):
        r1 = min(ny, r0 + band_rows)
        shape = (r1 - r0, nx)
        e = np.zeros(shape, np.float32)                # expected electrons, then electrons
        if exp.signal_adu is not None:
            if np.ndim(exp.signal_adu) == 0:
                np.multiply(flat[r0:r1], f32(exp.signal_adu) * gain, out=e)
            else:
                np.multiply(exp.signal_adu[r0:r1], flat[r0:r1], out=e)
                e *= gain
        if use_dark:
            e += det.dark[r0:r1] * t_exp
        if ph.noise:
            z = rng.standard_normal(shape, dtype=np.float32)
            if exp.signal_adu is not None or use_dark:
                np.maximum(e, f32(0.0), out=e)
                is_small = e < f32(POISSON_EXACT_BELOW)
                n_small = int(np.count_nonzero(is_small))
                if n_small == e.size:                  # e.g. a dark frame: all exact
                    e[...] = rng.poisson(e)
                    z *= rn_e
                    e += z
                else:
                    small = np.flatnonzero(is_small) if n_small else None
                    lam_small = e.reshape(-1)[small] if n_small else None
                    # lam + sqrt(V - 2 a^2) z + a (z^2 - 1), V = lam + RN^2, a = lam / (6 V):
                    # mean lam, variance V, third cumulant lam (+ 8 a^3, < 0.005 e-^3)
                    v = e + rn2
                    a = e / (f32(6.0) * v)
                    v -= f32(2.0) * a * a
                    np.sqrt(v, out=v)
                    v *= z
                    e += v
                    np.multiply(z, z, out=v)
                    v -= f32(1.0)
                    v *= a
                    e += v
                    if n_small:
                        e.reshape(-1)[small] = rng.poisson(lam_small) + rn_e * z.reshape(-1)[small]
            else:
                np.multiply(z, rn_e, out=e)            # bias frame: read noise only
        lo, hi = np.searchsorted(cr_pix, [r0 * nx, r1 * nx])
        if hi > lo:
            np.add.at(e.reshape(-1), cr_pix[lo:hi] - r0 * nx, cr_e[lo:hi].astype(np.float32))
        e *= inv_gain
        e += det.bias[r0:r1]
        e += f32(exp.bias_offset)
        if ph.noise:
            for b in noisy_cols:
                lo, hi = max(b.y0, r0), min(b.y1, r1)
                if hi > lo:
                    e[lo - r0:hi - r0, b.x] += rng.normal(0.0, b.value, hi - lo).astype(np.float32)
        np.rint(e, out=e)
        np.clip(e, 0, ADC_MAX, out=e)
        out[r0:r1] = e
    return out
