"""Detector model: bias structure, dark current and hot pixels, flat field, bad columns, and
the conversion of an expected signal into a raw 16-bit frame.

Units: the *flat-fielded* signal is in ADU (what a perfectly calibrated frame shows);
the detector multiplies it by the flat (the pixel response), converts to electrons with the
gain, adds dark current, draws Poisson noise, adds cosmic-ray charge, converts back to ADU,
adds the bias and read noise, and clips to the 16-bit range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gppy.sim.instrument import ADC_MAX, BIAS_LEVEL, DARK_CURRENT_E, EGAIN, READ_NOISE_E


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

    @property
    def read_noise_adu(self) -> float:
        return self.read_noise_e / self.gain

    @property
    def hot_pixel_mask(self) -> np.ndarray:
        return self.dark > 0.5

    def flat(self, filt: str) -> np.ndarray:
        """True response of filter ``filt``, normalised to a median of 1 (float32)."""
        if filt not in self._flats:
            ny, nx = self.shape
            resp = self.vignetting * self.prnu
            if self.physics.dust:
                if filt not in self.dust_filter:
                    rng = np.random.default_rng([self.seed, 77, _stable_hash(filt)])
                    self.dust_filter[filt] = _dust_rings(self.shape, max(1, len(self.dust_common) // 2), rng)
                resp = resp * _dust_image(self.shape, self.dust_common + self.dust_filter[filt])
            if self.physics.bad_columns:
                resp = resp.copy()
                for bc in self.bad_columns:
                    if bc.kind == "dead":
                        resp[bc.y0:bc.y1, bc.x] *= bc.value
            resp = resp / np.median(resp)
            self._flats[filt] = resp.astype(np.float32)
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


def _dust_image(shape: tuple[int, int], rings: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Multiplicative dust shadows: an annulus (donut) of radius R, depth d at each (x, y)."""
    img = np.ones(shape, np.float32)
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


def make_detector(shape: tuple[int, int], seed: int, physics: Physics | None = None) -> Detector:
    """Build the fixed-pattern detector of a unit (deterministic for ``seed``)."""
    physics = physics or Physics()
    ny, nx = shape
    rng = np.random.default_rng([seed, 1])
    # bias: level + column structure + a gentle row gradient
    bias = np.full(shape, BIAS_LEVEL, np.float32)
    if physics.bias_structure:
        cols = rng.normal(0.0, 1.5, nx) + 1.2 * np.sin(np.arange(nx) / nx * 6.0)
        cols[rng.integers(0, nx, max(1, nx // 300))] += rng.normal(0, 6.0, max(1, nx // 300))
        rows = np.linspace(-1.0, 1.0, ny) * 1.0
        bias += cols[None, :].astype(np.float32) + rows[:, None].astype(np.float32)
    # dark current + amplifier glow in one corner + hot pixels
    dark = np.zeros(shape, np.float32)
    if physics.dark_current:
        yy = np.arange(ny, dtype=np.float32)[:, None]
        xx = np.arange(nx, dtype=np.float32)[None, :]
        glow = 0.04 * np.exp(-(xx + (ny - 1 - yy)) / (0.05 * (nx + ny)))
        dark += DARK_CURRENT_E + glow
    if physics.hot_pixels:
        nhot = max(5, int(2e-4 * nx * ny))
        hy, hx = rng.integers(0, ny, nhot), rng.integers(0, nx, nhot)
        dark[hy, hx] += np.exp(rng.uniform(np.log(0.6), np.log(60.0), nhot)).astype(np.float32)
    # response: vignetting (centre ~1.06 x median), PRNU
    yy = (np.arange(ny, dtype=np.float32)[:, None] - (ny - 1) / 2) / (ny / 2)
    xx = (np.arange(nx, dtype=np.float32)[None, :] - (nx - 1) / 2) / (nx / 2)
    rho2 = (xx * xx * nx * nx + yy * yy * ny * ny) / (nx * nx + ny * ny)
    vig = (1.0 - 0.10 * rho2 - 0.04 * rho2 * rho2) if physics.vignetting else np.ones(shape, np.float32)
    vig = vig.astype(np.float32)
    prnu = (1.0 + rng.normal(0.0, 0.005, shape)).astype(np.float32) if physics.prnu else np.ones(shape, np.float32)
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

    ``signal_adu`` is the flat-fielded signal (sky + sources, ADU) or None for dark/bias.
    """

    exptime: float
    filt: str | None
    signal_adu: np.ndarray | None
    cr_pix: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cr_e: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bias_offset: float = 0.0


def read_out(det: Detector, exp: Exposure, rng: np.random.Generator, band_rows: int = 1024) -> np.ndarray:
    """Turn an :class:`Exposure` into raw uint16 ADU (processed in bands of rows to save memory)."""
    ny, nx = det.shape
    out = np.empty(det.shape, np.uint16)
    ph = det.physics
    flat = det.flat(exp.filt) if (exp.signal_adu is not None and exp.filt) else None
    order = np.argsort(exp.cr_pix, kind="stable")
    cr_pix, cr_e = exp.cr_pix[order], exp.cr_e[order]
    noisy_cols = [b for b in det.bad_columns if b.kind == "noisy"] if ph.bad_columns else []
    inv_gain = np.float32(1.0 / det.gain)
    rn = np.float32(det.read_noise_adu)
    for r0 in range(0, ny, band_rows):
        r1 = min(ny, r0 + band_rows)
        e = np.zeros((r1 - r0, nx), np.float32)
        if exp.signal_adu is not None:
            e += exp.signal_adu[r0:r1] * flat[r0:r1] * np.float32(det.gain)
        if ph.dark_current or ph.hot_pixels or ph.bad_columns:
            e += det.dark[r0:r1] * np.float32(exp.exptime)
        if ph.noise:
            e = rng.poisson(np.maximum(e, 0.0)).astype(np.float32)
        lo, hi = np.searchsorted(cr_pix, [r0 * nx, r1 * nx])
        if hi > lo:
            np.add.at(e.reshape(-1), cr_pix[lo:hi] - r0 * nx, cr_e[lo:hi].astype(np.float32))
        adu = e * inv_gain + det.bias[r0:r1] + np.float32(exp.bias_offset)
        if ph.noise:
            adu += rng.standard_normal(adu.shape, dtype=np.float32) * rn
            for b in noisy_cols:
                lo, hi = max(b.y0, r0), min(b.y1, r1)
                if hi > lo:
                    adu[lo - r0:hi - r0, b.x] += rng.normal(0.0, b.value, hi - lo).astype(np.float32)
        np.rint(adu, out=adu)
        np.clip(adu, 0, ADC_MAX, out=adu)
        out[r0:r1] = adu.astype(np.uint16)
    return out
