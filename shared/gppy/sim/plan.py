"""The observing plan of a simulated night: targets, visits and every frame's time."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.time import Time, TimeDelta

from gppy import naming
from gppy.sim.header import local_sidereal_deg

READOUT_S = 15.0          # dead time between frames of a sequence
SLEW_S = 60.0             # between visits
N_PER_VISIT = 3
SPECIAL_TILES = {4231, 4409, 4590}


@dataclass
class Target:
    """A pointing target: a sky-grid tile (``T#####``) or a named field."""

    name: str
    ra: float
    dec: float
    tile_id: int | None = None

    @property
    def is_tile(self) -> bool:
        return self.tile_id is not None


@dataclass
class FrameSpec:
    """One raw frame of the night."""

    index: int                    # global, fixes the frame's random stream
    kind: str                     # science | bias | dark | flat
    obj: str                      # OBJECT (BIAS/DARK/FLAT for calibration)
    filt: str
    exptime: float
    t_start: Time
    seq: int                      # running number within its sequence (NNNN)
    spelling: int = 0             # which IMAGETYP spelling
    target: int | None = None     # index into Plan.targets
    visit: int | None = None      # index into Plan.visits

    def filename(self, unit: str) -> str:
        """``<UNIT>_<YYYYMMDD>_<HHMMSS>_<OBJECT>_<FILTER>_1x1_<EXPTIME>s_<NNNN>.fits``."""
        d, t = naming.date_time_fields(self.t_start.isot)
        return f"{unit}_{d}_{t}_{self.obj}_{self.filt}_1x1_{self.exptime:.1f}s_{self.seq:04d}.fits"

    @property
    def t_mid(self) -> Time:
        return self.t_start + TimeDelta(self.exptime / 2.0, format="sec")


@dataclass
class Visit:
    """Consecutive frames of one target and filter with one pointing."""

    index: int
    target: int
    filt: str
    exptime: float
    frames: list[int] = field(default_factory=list)


@dataclass
class Plan:
    unit: str
    night: str                    # local date YYYY-MM-DD of the night's start
    targets: list[Target]
    visits: list[Visit]
    frames: list[FrameSpec]

    @property
    def folder(self) -> str:
        return f"{self.night}_gain2750"

    def science(self) -> list[FrameSpec]:
        return [f for f in self.frames if f.kind == "science"]


def _tile_ids(rng: np.random.Generator, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        t = int(rng.integers(100, 28000))
        if t not in SPECIAL_TILES and t not in ids:
            ids.append(t)
    return ids


def make_plan(unit: str, night: str, n_targets: int, filters: list[str], rng: np.random.Generator,
              calib: bool = True, extras: bool = True, n_bias: int = 7, n_dark: int = 5,
              n_flat: int = 5, dark_exptimes: tuple[float, ...] = (100.0, 300.0),
              science_exptime: float = 100.0) -> Plan:
    """Build the night: calibration sequences at dusk, then visits of every target in every
    filter (3 x ``science_exptime``). With ``extras``: one 3 x 300 s visit of the first target
    and a single 45 s frame of the last target.

    Targets are placed near the meridian at the time they are observed, so airmasses are low.
    """
    d0 = Time(f"{night}T00:00:00", scale="utc")
    frames: list[FrameSpec] = []
    visits: list[Visit] = []

    def add(kind: str, obj: str, filt: str, exptime: float, t: Time, seq: int, spelling: int = 0,
            target: int | None = None, visit: int | None = None) -> None:
        frames.append(FrameSpec(len(frames), kind, obj, filt, exptime, t, seq, spelling, target, visit))

    if calib:
        t = d0 + TimeDelta(21.5 * 3600, format="sec")
        for i in range(n_bias):
            add("bias", "BIAS", filters[0], 0.0, t, i, spelling=1 if i == n_bias - 1 else 0)
            t = t + TimeDelta(8.0, format="sec")
        for exptime in dark_exptimes:
            for i in range(n_dark):
                add("dark", "DARK", filters[0], float(exptime), t, i, spelling=1 if i == n_dark - 1 else 0)
                t = t + TimeDelta(exptime + READOUT_S, format="sec")
        t = d0 + TimeDelta(24.1 * 3600, format="sec")
        for filt in filters:
            exptime = float(np.round(rng.uniform(3.0, 20.0), 1))
            for i in range(n_flat):
                add("flat", "FLAT", filt, exptime, t, i, spelling=2 if i == n_flat - 1 else 0)
                t = t + TimeDelta(exptime + READOUT_S, format="sec")
            t = t + TimeDelta(30.0, format="sec")

    t = d0 + TimeDelta(25.0 * 3600, format="sec")
    targets: list[Target] = []
    tile_ids = _tile_ids(rng, n_targets)
    for k in range(n_targets):
        seqs: list[tuple[str, float, int]] = [(f, science_exptime, N_PER_VISIT) for f in filters]
        if extras and k == 0:
            seqs.append((filters[0], 300.0, N_PER_VISIT))
        if extras and k == n_targets - 1:
            seqs.append((filters[-1], 45.0, 1))
        duration = sum(n * (e + READOUT_S) + SLEW_S for _, e, n in seqs)
        lst = local_sidereal_deg(t + TimeDelta(duration / 2, format="sec"))
        ra = float((lst + rng.uniform(-10.0, 10.0)) % 360.0)
        dec = float(rng.uniform(-45.0, -15.0))
        named = n_targets >= 2 and k == n_targets - 1
        targets.append(Target("SIMF01", ra, dec, None) if named
                       else Target(f"T{tile_ids[k]:05d}", ra, dec, tile_ids[k]))
        for filt, exptime, n in seqs:
            v = Visit(len(visits), k, filt, exptime)
            visits.append(v)
            for i in range(n):
                v.frames.append(len(frames))
                spelling = 1 if (k == n_targets - 1 and i == n - 1 and filt == filters[-1]) else 0
                add("science", targets[k].name, filt, exptime, t, i, spelling, k, v.index)
                t = t + TimeDelta(exptime + READOUT_S, format="sec")
            t = t + TimeDelta(SLEW_S, format="sec")
    return Plan(unit, night, targets, visits, frames)
