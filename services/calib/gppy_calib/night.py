"""One night of calibration: scan the folder, build or borrow masters, plan and reduce frames.

This is the I/O side of the stage (it reads raw files and the master archive and writes
products with atomic writes); the science lives in :mod:`~gppy_calib.combine`,
:mod:`~gppy_calib.masters`, :mod:`~gppy_calib.reduce`, :mod:`~gppy_calib.masks` and
:mod:`~gppy_calib.trails`. :class:`gppy_calib.service.CalibService` runs it in a thread.

Order of work (the whole stage, in one place):

1. scan: read every ``*.fits`` header, normalise (``changehdr.dat``), classify, check;
   unreadable, truncated or unclassifiable files go to ``rejected`` with the reason;
2. bias -> darks (per EXPTIME) -> flats (per FILTER): build tonight's master from tonight's
   frames, compare it with the previous archived one (QC), archive it; when tonight has no
   frames of a kind (or its master failed QC) borrow the archived master nearest in date;
3. plan: every science frame gets its bias, dark (nearest EXPTIME, scaled) and flat, its
   product path and its visit; frames without a usable master set are rejected;
4. reduce each planned frame: image, ``.weight.fits`` and ``.mask.fits``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import Counter, OrderedDict, defaultdict
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from astropy.io import fits

from gppy import masks as gmasks
from gppy import naming
from gppy.config import PathConfig, Settings
from gppy.fitsio import BadInputError, atomic_path, read_header
from gppy.masks import MaskBit
from gppy.provenance import stamp
from gppy.tables import load_changehdr, load_obs
from gppy.visits import FrameInfo as VisitFrame
from gppy.visits import group_visits
from gppy.xp import backend_name
from gppy_calib import archive, frame, masks, reduce, trails
from gppy_calib.combine import median_error_factor
from gppy_calib.headers import FrameInfo, HeaderProblem, describe
from gppy_calib.masters import ClipRule, Master, make_bias, make_dark, make_flat, qc_compare
from gppy_calib.rawio import RawImage, list_masters, read_master, write_master

log = logging.getLogger(__name__)

FITS_SUFFIXES = (".fits", ".fit", ".fts")


@dataclass
class MasterRef:
    """A master chosen for use: where it is and how it was obtained.

    Attributes
    ----------
    kind : {"bias", "dark", "flat"}
    path : pathlib.Path
    date : str
        ``YYYYMMDD``.
    exptime : float
        s (darks).
    filter : str
        (flats).
    borrowed : bool
        True when it is not tonight's own master.
    note : str
        Why it was borrowed (e.g. tonight's master failed QC).
    """

    kind: str
    path: Path
    date: str
    exptime: float = 0.0
    filter: str = ""
    borrowed: bool = False
    note: str = ""

    def describe(self) -> str:
        d = f"{self.date[:4]}-{self.date[4:6]}-{self.date[6:]}"
        text = f"{self.path.name} from {d}"
        return f"{text} ({self.note})" if self.note else text


@dataclass
class Job:
    """One science frame to reduce."""

    info: FrameInfo
    calib_path: Path
    visit: str
    bias: MasterRef
    dark: MasterRef
    flat: MasterRef


@dataclass
class NightResult:
    """What :meth:`NightCalibrator.prepare` found and decided."""

    jobs: list[Job] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    borrowed: dict[str, str] = field(default_factory=dict)
    masters: list[Path] = field(default_factory=list)
    qc: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass
class Products:
    """Files written for one science frame, plus a few numbers for logs and tests."""

    image: Path
    weight: Path
    mask: Path
    ncr: int = 0
    ntrail: int = 0
    trails: list = field(default_factory=list)


def _settings_subset(settings: Settings) -> dict:
    keys = ["clip_sigma", "clip_iters", "combine_band_rows", "master_qc_threshold", "cosmic_rays",
            "satellite_trails", "saturate_adu"]
    return {k: getattr(settings, k) for k in keys}


class NightCalibrator:
    """Calibrate one night of one unit (synchronous; run it in a worker thread).

    Parameters
    ----------
    settings : gppy.config.Settings
    paths : gppy.config.PathConfig
    unit : str
        Telescope unit (``7DT01``...).
    xp : module
        NumPy or CuPy.
    """

    cache_size = 4
    edge_pixels = 0
    #: Threads of the banded reduction pass (NumPy) and of the astroscrappy mosaics (one
    #: thread when the trail search runs beside it).
    workers = 2
    #: Start writing the products before the cosmic-ray and trail searches (their pixels are
    #: then patched in the files): faster when a core is free, not when the machine is busy.
    write_early = True

    def __init__(self, settings: Settings, paths: PathConfig, unit: str, xp: ModuleType):
        self.settings = settings
        self.paths = paths
        self.unit = naming.sanitize(unit, "UNIT")
        self.xp = xp
        self.rules = load_changehdr()
        self.clip = ClipRule(settings.clip_sigma, settings.clip_iters, settings.combine_band_rows)
        self.mroot = Path(paths.path_mframe)
        self._cache: OrderedDict[Path, tuple[np.ndarray, np.ndarray, fits.Header]] = OrderedDict()
        self._setcache: dict[tuple, dict] = {}
        self._buf: frame.FrameBuffers | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: Wall and CPU time (s, all threads) of the steps of the last :meth:`reduce`.
        self.last_steps: dict[str, float] = {}
        self.last_steps_cpu: dict[str, float] = {}
        #: Id of the night-ready message being handled, stamped as CALRUNID on each product.
        self.run_id = ""

    # ------------------------------------------------------------------ scan
    def scan(self, night_dir: Path, targets: list[str] | None = None,
             filters: list[str] | None = None) -> tuple[dict[str, list[FrameInfo]], dict[str, str], list[str]]:
        """Headers of every FITS file of the night, classified.

        Returns
        -------
        frames : dict kind -> list of FrameInfo (sorted by DATE-OBS, then path)
        rejected : dict path -> reason
        skipped : list of str
            Science frames outside the requested targets / filters.
        """
        night_dir = Path(night_dir)
        if not night_dir.is_dir():
            raise BadInputError(night_dir, "night folder does not exist or is not a folder")
        files = sorted(p for p in night_dir.iterdir()
                       if p.is_file() and p.suffix.lower() in FITS_SUFFIXES and not p.name.startswith("."))
        frames: dict[str, list[FrameInfo]] = defaultdict(list)
        rejected: dict[str, str] = {}
        skipped: list[str] = []
        for p in files:
            try:
                hdr = read_header(p)
                RawImage(p, hdr)                   # size / layout check, no data read
                info = describe(str(p), hdr, self.rules)
            except BadInputError as exc:
                rejected[str(p)] = exc.reason
                continue
            except HeaderProblem as exc:
                rejected[str(p)] = str(exc)
                continue
            if info.kind == "science" and ((targets and info.object not in targets)
                                           or (filters and info.filter not in filters)):
                skipped.append(str(p))
                continue
            frames[info.kind].append(info)
        # one detector shape per night: frames of another shape cannot share masters
        shapes = Counter(f.shape for group in frames.values() for f in group)
        if len(shapes) > 1:
            main = max(shapes.items(), key=lambda kv: (kv[1], kv[0]))[0]
            for kind in list(frames):
                keep = []
                for f in frames[kind]:
                    if f.shape == main:
                        keep.append(f)
                    else:
                        rejected[f.path] = f"image shape {f.shape} differs from the night's {main}"
                frames[kind] = keep
        # one exposure, one file: a copy under another name (X.fits and X.fit, "X (1).fits") would
        # give the same product twice and count twice in its visit or master
        for kind in list(frames):
            first: dict[tuple, str] = {}
            keep = []
            for f in sorted(frames[kind], key=lambda f: f.path):
                key = (f.date_obs, f.object, f.filter, f.exptime)
                if key in first:
                    rejected[f.path] = (f"duplicate of {Path(first[key]).name}: the same exposure (DATE-OBS "
                                        f"{f.date_obs}, OBJECT, FILTER, EXPTIME) in another file")
                else:
                    first[key] = f.path
                    keep.append(f)
            frames[kind] = keep
        for kind in frames:
            frames[kind].sort(key=lambda f: (f.mjd, f.path))
        return dict(frames), rejected, skipped

    # ------------------------------------------------------------------ archive
    def _folder(self, kind: str) -> Path:
        return self.mroot / self.unit / archive.KIND_FOLDERS[kind]

    def _archived(self, kind: str) -> list[archive.ArchivedMaster]:
        return archive.parse_listing(list_masters(self._folder(kind)), kind)

    def _dest(self, kind: str, m: Master) -> Path:
        if kind == "bias":
            return naming.master_zero(self.mroot, self.unit, m.date)
        if kind == "dark":
            return naming.master_dark(self.mroot, self.unit, m.exptime, m.date)
        return naming.master_flat(self.mroot, self.unit, m.filter, m.date)

    def load(self, path: Path) -> tuple[np.ndarray, np.ndarray, fits.Header]:
        """A master's (data, error, header), through a small cache."""
        path = Path(path)
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        item = read_master(path)
        self._cache[path] = item
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return item

    def _as_master(self, ref: MasterRef) -> Master:
        data, err, hdr = self.load(ref.path)
        err = np.where(np.isfinite(err), err, np.float32(0)).astype(np.float32)
        return Master(ref.kind, data, err, ref.exptime, ref.filter, ref.date, "", [], hdr)

    def _archive_new(self, kind: str, m: Master, qc_key: str, res: NightResult) -> MasterRef:
        """QC a new master against the previous archived one and archive it (or set it aside).

        Returns the master to use: the new one, or the previous one when QC fails.
        """
        dest = self._dest(kind, m)
        cands = self._archived(kind)
        if kind == "dark":
            cands = [c for c in cands if round(c.exptime) == round(m.exptime)]
        prev = archive.choose(cands, mean_date_mjd(m), filt=(m.filter if kind == "flat" else None),
                              before=m.date)
        m.header["FILENAME"] = (dest.name, "archive name of this master")
        if prev is not None:
            pdata, perr, _ = self.load(prev.path)
            qc = qc_compare(m, pdata, perr, self.settings.master_qc_threshold)
            m.header["QCREF"] = (prev.path.name[:68], "previous master compared with")
            m.header["QCFRAC"] = (round(qc.fraction, 6), "fraction of pixels differing > 6 sigma")
            m.header["QCSTAT"] = ("pass" if qc.ok else "fail", "QC against the previous master")
        else:
            qc = None
            m.header["QCSTAT"] = ("none", "no previous master to compare with")
        stamp(m.header, "calib", m.inputs, _settings_subset(self.settings))
        if qc is not None and not qc.ok:
            aside = dest.parent / "rejected" / dest.name
            write_master(aside, m.data, m.error, m.header)
            res.qc[qc_key] = f"{dest.name} set aside in rejected/: {qc.reason}"
            log.warning("master %s failed QC: %s; using %s", dest.name, qc.reason, prev.path.name)
            return MasterRef(kind, prev.path, prev.date, prev.exptime, prev.filter, borrowed=True,
                             note=f"tonight's master failed QC: {qc.reason}")
        write_master(dest, m.data, m.error, m.header)
        res.masters.append(dest)
        if qc is not None:
            res.qc[qc_key] = f"{dest.name}: {qc.reason}"
        # keep it in the cache: it is about to be used
        self._cache[dest] = (m.data, m.error, m.header)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return MasterRef(kind, dest, m.date, m.exptime, m.filter)

    def _borrow(self, kind: str, reference_mjd: float, *, exptime: float | None = None,
                filt: str | None = None, note: str = "") -> MasterRef | None:
        pick = archive.choose(self._archived(kind), reference_mjd, exptime=exptime, filt=filt)
        if pick is None:
            return None
        return MasterRef(kind, pick.path, pick.date, pick.exptime, pick.filter, borrowed=True,
                         note=note)

    # ------------------------------------------------------------------ masters
    def _sources(self, frames: list[FrameInfo], res: NightResult) -> tuple[list[FrameInfo], list[RawImage]]:
        good, srcs = [], []
        for f in frames:
            try:
                srcs.append(RawImage(f.path, f.header))
                good.append(f)
            except BadInputError as exc:
                res.rejected[f.path] = exc.reason
        return good, srcs

    def prepare(self, night_dir: Path, targets: list[str] | None = None,
                filters: list[str] | None = None) -> NightResult:
        """Scan the night, build/borrow masters and plan the science frames."""
        res = NightResult()
        frames, rejected, skipped = self.scan(night_dir, targets, filters)
        res.rejected.update(rejected)
        res.skipped = skipped
        science = frames.get("science", [])
        all_mjd = [f.mjd for group in frames.values() for f in group]
        ref_mjd = float(np.mean([f.mjd for f in science])) if science else (
            float(np.mean(all_mjd)) if all_mjd else 0.0)
        sat = self.settings.saturate_adu

        # bias
        bias_ref: MasterRef | None = None
        bias_frames, bias_srcs = self._sources(frames.get("bias", []), res)
        if bias_frames:
            m = make_bias(bias_frames, bias_srcs, self.xp, self.clip)
            bias_ref = self._archive_new("bias", m, "bias", res)
        if bias_ref is None:
            bias_ref = self._borrow("bias", ref_mjd)
        if bias_ref is not None and bias_ref.borrowed:
            res.borrowed["bias"] = bias_ref.describe()

        # darks (per exposure time)
        dark_refs: dict[float, MasterRef] = {}
        dark_groups: dict[float, list[FrameInfo]] = defaultdict(list)
        for f in frames.get("dark", []):
            dark_groups[f.exptime].append(f)
        if dark_groups and bias_ref is None:
            for group in dark_groups.values():
                for f in group:
                    res.rejected[f.path] = "no master bias (none tonight, none archived): dark not usable"
            dark_groups = {}
        for t, group in sorted(dark_groups.items()):
            good, srcs = self._sources(group, res)
            if not good:
                continue
            m = make_dark(good, srcs, self._as_master(bias_ref), self.xp, self.clip)
            ref = self._archive_new("dark", m, f"dark {t:g}", res)
            dark_refs[t] = ref
            if ref.borrowed:
                res.borrowed[f"dark {ref.exptime:g}"] = ref.describe()

        # flats (per filter)
        flat_refs: dict[str, MasterRef] = {}
        flat_groups: dict[str, list[FrameInfo]] = defaultdict(list)
        for f in frames.get("flat", []):
            flat_groups[f.filter].append(f)
        if flat_groups and bias_ref is None:
            for group in flat_groups.values():
                for f in group:
                    res.rejected[f.path] = "no master bias (none tonight, none archived): flat not usable"
            flat_groups = {}
        for filt, group in sorted(flat_groups.items()):
            good, srcs = self._sources(group, res)
            if not good:
                continue
            flat_mjd = float(np.mean([f.mjd for f in good]))
            darks: dict[float, Master] = {}
            for f in good:
                dref = self._dark_for(f.exptime, dark_refs, flat_mjd)
                if dref is not None:
                    darks[dref.exptime] = self._as_master(dref)
            try:
                m = make_flat(good, srcs, self._as_master(bias_ref), darks, self.xp, self.clip, saturate=sat)
            except ValueError as exc:
                for f in good:
                    res.rejected.setdefault(f.path, str(exc))
                continue
            res.rejected.update(m.rejected)
            ref = self._archive_new("flat", m, f"flat {filt}", res)
            flat_refs[filt] = ref
            if ref.borrowed:
                res.borrowed[f"flat {filt}"] = ref.describe()

        # plan
        visits = group_visits([VisitFrame(f.path, f.object, f.filter, f.date_obs, f.exptime) for f in science],
                              self.settings.visit_gap_s)
        visit_of = {vf.key: vid for vid, members in visits.items() for vf in members}
        for f in sorted(science, key=lambda f: (f.filter, f.mjd, f.path)):
            if bias_ref is None:
                res.rejected[f.path] = (f"no master bias: no bias frames tonight and none archived under "
                                        f"{self._folder('bias')}")
                continue
            dref = self._dark_for(f.exptime, dark_refs, ref_mjd)
            if dref is None:
                res.rejected[f.path] = (f"no master dark: no dark frames tonight and none archived under "
                                        f"{self._folder('dark')}")
                continue
            if dref.borrowed and dref not in dark_refs.values():
                res.borrowed[f"dark {dref.exptime:g}"] = dref.describe()
            fref = flat_refs.get(f.filter)
            if fref is None:
                fref = self._borrow("flat", ref_mjd, filt=f.filter)
                if fref is None:
                    res.rejected[f.path] = (f"no master flat for filter {f.filter}: no flats tonight and none "
                                            f"archived under {self._folder('flat')}")
                    continue
                res.borrowed[f"flat {f.filter}"] = fref.describe()
            dirs = naming.ProductDirs.of(self.paths.path_processed, f.object, self.unit, f.filter)
            calib = dirs.base / naming.calib_name(self.unit, f.object, f.date_obs, f.filter, f.exptime)
            res.jobs.append(Job(f, calib, visit_of[f.path], bias_ref, dref, fref))
        return res

    def _dark_for(self, exptime: float, tonight: dict[float, MasterRef], ref_mjd: float) -> MasterRef | None:
        """Tonight's dark nearest in exposure time, else the archived one (nearest date first)."""
        if tonight:
            t = min(tonight, key=lambda d: (abs(d - exptime), -d))
            return tonight[t]
        return self._borrow("dark", ref_mjd, exptime=exptime)

    # ------------------------------------------------------------------ reduction
    def _calib_set(self, job: Job, gain: float, rn_adu: float, sat_raw: float, scale: float) -> dict:
        """Everything that depends on the masters and not on the frame, computed once for the
        frames that share them (frames come grouped by filter and time): the reduction and
        variance terms with the bad-pixel mask (:class:`gppy_calib.frame.FrameTerms`), the
        effective gain and the reduced saturation level."""
        key = (job.bias.path, job.dark.path, job.flat.path, self.edge_pixels, gain, rn_adu, sat_raw, scale)
        if key in self._setcache:
            return self._setcache[key]
        self._setcache.clear()            # one master set at a time
        xp = self.xp
        b, be, bh = self.load(job.bias.path)
        d, de, _ = self.load(job.dark.path)
        fl, fe, _ = self.load(job.flat.path)
        bad = masks.master_bad_pixels(xp, b, be, d, de, job.dark.exptime, fl, fe, gain,
                                      int(bh.get("NCOMBINE", 0)))
        bad = bad | masks.edge_mask(xp, bad.shape, self.edge_pixels)
        good = bad == 0
        cset = {
            "terms": frame.frame_terms(b, d, fl, be, de, fe, bad, scale, gain, rn_adu, xp),
            "egain": reduce.effective_gain(gain, fl, good, xp),
            "sat_red": reduce.reduced_saturation(sat_raw, b, d, scale, fl, good, xp),
        }
        self._setcache[key] = cset
        return cset

    def _threads(self) -> ThreadPoolExecutor:
        """Worker threads of the reductions (bands, writes, cosmic rays), kept for the night."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(4, self.workers), thread_name_prefix="calib")
        return self._pool

    def _buffers(self, shape: tuple[int, int]) -> frame.FrameBuffers:
        """Product buffers of this shape, reused from frame to frame."""
        if self._buf is None or self._buf.shape != tuple(shape):
            self._buf = None
            self._buf = frame.FrameBuffers.empty(tuple(shape))
        return self._buf

    @staticmethod
    def _timed(steps: dict, name: str, func, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            steps[f"{name} (in detect)"] = time.perf_counter() - t0

    def _gain(self, hdr: fits.Header) -> tuple[float, str]:
        try:
            g = float(hdr["EGAIN"])
            if np.isfinite(g) and g > 0:
                return g, "raw header EGAIN"
        except (KeyError, TypeError, ValueError):
            pass
        obs = load_obs().get(self.unit)
        g = float(obs["gain"]) if obs else 1.0
        log.warning("no usable EGAIN in the raw header; using %.3g e-/ADU from obs.dat", g)
        return g, "obs.dat (no EGAIN in the raw header)"

    def _read_noise_adu(self, hdr: fits.Header, bias_hdr: fits.Header, bias_err: np.ndarray,
                        gain: float) -> float:
        """Read noise (raw ADU): raw RDNOISE (e-), else the master bias's measurement, else
        its error image, else 0."""
        for value, conv in ((hdr.get("RDNOISE"), 1.0 / gain), (bias_hdr.get("RDNADU"), 1.0)):
            try:
                v = float(value) * conv
            except (TypeError, ValueError):
                continue
            if np.isfinite(v) and v > 0:
                return v
        n = int(bias_hdr.get("NCOMBINE", 0))
        if n >= 2:
            med = float(np.nanmedian(bias_err[::8, ::8]))
            if np.isfinite(med) and med > 0:
                return med * np.sqrt(n) / median_error_factor(n)
        return 0.0

    def reduce(self, job: Job) -> Products:
        """Reduce one science frame and write its image, weight and mask.

        One pass over the pixels in row bands (:func:`gppy_calib.frame.reduce_pass`) gives the
        image, mask, weight, the cosmic-ray candidates and the trail search's binned S/N; the
        cosmic rays (astroscrappy around the candidates) and trails (Hough on the binned S/N)
        then add their bits to the mask and zero the weight there; the three files are
        written in parallel.
        """
        xp = self.xp
        info = job.info
        steps: dict[str, float] = {}
        steps_cpu: dict[str, float] = {}
        clock = [time.perf_counter(), time.process_time()]

        def lap(name: str) -> None:
            now, cpu = time.perf_counter(), time.process_time()
            steps[name] = steps.get(name, 0.0) + now - clock[0]
            steps_cpu[name] = steps_cpu.get(name, 0.0) + cpu - clock[1]
            clock[:] = [now, cpu]

        raw = RawImage(info.path)
        b, be, bh = self.load(job.bias.path)
        d, _, _ = self.load(job.dark.path)
        fl, _, _ = self.load(job.flat.path)
        for name, arr in (("bias", b), ("dark", d), ("flat", fl)):
            if arr.shape != raw.shape:
                raise BadInputError(info.path, f"frame shape {tuple(raw.shape)} differs from the master "
                                               f"{name} {arr.shape}")
        gain, gain_src = self._gain(info.header)
        scale = reduce.dark_scale(info.exptime, job.dark.exptime)
        sat_raw = float(self.settings.saturate_adu)
        if "SATURATE" in info.header:
            try:
                sat_raw = min(sat_raw, float(info.header["SATURATE"]))
            except (TypeError, ValueError):
                pass
        rn_adu = self._read_noise_adu(info.header, bh, be, gain)
        cset = self._calib_set(job, gain, rn_adu, sat_raw, scale)
        terms: frame.FrameTerms = cset["terms"]
        egain, sat_red = cset["egain"], cset["sat_red"]
        cr_on, tr_on = bool(self.settings.cosmic_rays), bool(self.settings.satellite_trails)
        lap("masters")
        stats = frame.frame_statistics(raw, terms, sat_raw, xp, background=tr_on)
        if stats.maybe_empty:
            check_signal(info.path, raw.read())         # a frame without data is refused here
        buf = self._buffers(raw.shape)
        fp = frame.reduce_pass(raw, terms, stats, sat_raw, egain, buf, xp, cosmic_rays=cr_on,
                               satellite_trails=tr_on, workers=self.workers, pool=self._threads())
        lap("pass")
        sky = stats.sky
        image_path = job.calib_path
        weight_path = naming.weight_of(image_path)
        mask_path = naming.flag_of(image_path)
        counts = dict(fp.counts, cosmic_ray=0, trail=0)
        hdr, whdr, mhdr = self._product_headers(job, gain, gain_src, egain, rn_adu, sat_raw, sat_red, scale, sky,
                                                counts, [], (image_path, weight_path, mask_path))
        products = ((image_path, buf.image_be, hdr), (weight_path, buf.weight_be, whdr), (mask_path, buf.mask_be, mhdr))
        trail_list: list = []
        cr_y = cr_x = np.zeros(0, np.int64)
        with contextlib.ExitStack() as stack:
            tmp = [stack.enter_context(atomic_path(path)) for path, _, _ in products]
            pool = self._threads()
            # the three files are written (into their temporary names) while the cosmic rays
            # and trails are searched; their pixels are then patched in the files and the
            # image header's counts rewritten in place (same size)
            written: list = []

            def start_writes() -> None:
                written.extend(pool.submit(_write_image, t, data, h)
                               for t, (_, data, h) in zip(tmp, products, strict=True))
                # whatever happens, no thread is left writing a file or reading the buffers when
                # the files are renamed (or removed, after an error)
                stack.callback(futures.wait, list(written))

            if self.write_early:
                start_writes()
            # cosmic rays (astroscrappy, which releases the GIL) in a thread while the trail search
            # runs here; both only read the buffers, the flags are set after
            fut = None
            if cr_on and fp.cr_y.size:
                fut = pool.submit(self._timed, steps, "cosmic_rays", masks.cosmic_ray_windows, buf.image_be,
                                  lambda y, x: frame.variance_at(terms, sky, y, x, xp), buf.mask_be, fp.cr_y, fp.cr_x,
                                  sky, egain, rn_adu * gain, sat_red, workers=1 if tr_on else self.workers)
                stack.callback(futures.wait, [fut])
            if tr_on:
                snr = frame.PixelSNR(buf.image_be, terms, stats, buf.mask_be, xp, exclude=(fp.cr_y, fp.cr_x))
                trail_list = self._timed(steps, "trails", trails.search, fp.binned, snr)
            if fut is not None:
                cr_y, cr_x = fut.result()
            ny, nx = raw.shape
            flagged = [cr_y * nx + cr_x]
            frame.flag_pixels(buf, cr_y, cr_x, int(MaskBit.COSMIC_RAY))
            if trail_list:
                pix = [trails.trail_pixels(raw.shape, t) for t in trail_list]
                tflat = np.unique(np.concatenate([ty * nx + tx for ty, tx in pix]))
                counts["trail"] = int(tflat.size)
                frame.flag_pixels(buf, tflat // nx, tflat % nx, int(MaskBit.TRAIL))
                flagged.append(tflat)
            counts["cosmic_ray"] = int(cr_y.size)
            lap("detect")
            if not written:
                start_writes()
            flat = np.unique(np.concatenate(flagged))
            fy, fx = flat // nx, flat % nx
            final = hdr.copy()                      # only the counts differ from the first header
            final["NCRPIX"] = counts["cosmic_ray"]
            final["NTRAIL"] = len(trail_list)
            final["NTRLPIX"] = counts["trail"]
            on_disk = [w.result() for w in written]
            lap("write_wait")
            _patch_header(tmp[0], on_disk[0], final, ("NCRPIX", "NTRAIL", "NTRLPIX"), buf.image_be)
            _patch_pixels(tmp[1], on_disk[1], buf.weight_be, fy, fx)
            _patch_pixels(tmp[2], on_disk[2], buf.mask_be, fy, fx)
            lap("patch")
        lap("write")
        self.last_steps, self.last_steps_cpu = steps, steps_cpu
        ncr = counts["cosmic_ray"]
        return Products(image_path, weight_path, mask_path, ncr, len(trail_list), trail_list)

    def _product_headers(self, job: Job, gain: float, gain_src: str, egain: float, rn_adu: float, sat_raw: float,
                         sat_red: float, scale: float, sky: float, counts: dict, trail_list: list,
                         paths: tuple[Path, Path, Path]) -> tuple[fits.Header, fits.Header, fits.Header]:
        """Headers of the image, weight and mask of a reduced frame."""
        info = job.info
        image_path, weight_path, mask_path = paths
        hdr = self._science_header(job, gain, gain_src, egain, rn_adu, sat_raw, sat_red, scale, sky, counts,
                                   trail_list)
        hdr["WEIGHTIM"] = weight_path.name[:68]        # inverse-variance weight map
        hdr["MASKIM"] = mask_path.name[:68]            # bit mask (gppy.masks.MaskBit), int16
        inputs = [info.path, job.bias.path, job.dark.path, job.flat.path]
        subset = _settings_subset(self.settings)
        stamp(hdr, "calib", inputs, subset)
        whdr = self._aux_header(info, "weight", "inverse variance [ADU^-2]; 0 where masked", image_path)
        stamp(whdr, "calib", inputs, subset)
        mhdr = self._aux_header(info, "mask", "bit mask, see MASKB_* and gppy.masks.MaskBit", image_path)
        for name, value in gmasks.describe().items():
            mhdr[f"HIERARCH MASKB_{name}"] = value
        stamp(mhdr, "calib", inputs, subset)
        # the mask is int16 without BZERO, as gppy.fitsio.write_mask writes it (its bits fit
        # in 15 bits by construction)
        for key in ("BZERO", "BSCALE"):
            mhdr.remove(key, ignore_missing=True)
        return hdr, whdr, mhdr

    def _aux_header(self, info: FrameInfo, kind: str, what: str, image: Path) -> fits.Header:
        h = fits.Header()
        for key in ("OBJECT", "FILTER", "EXPTIME", "DATE-OBS", "TELESCOP"):
            if key in info.header:
                h[key] = info.header[key]
        h["PRODTYPE"] = (kind, what)
        h["IMAGE"] = image.name[:68]                   # the image this map belongs to
        return h

    def _science_header(self, job: Job, gain: float, gain_src: str, egain: float, rn_adu: float,
                        sat_raw: float, sat_red: float, scale: float, sky: float, counts: dict,
                        trail_list: list) -> fits.Header:
        hdr = job.info.header.copy()
        for key in ("BZERO", "BSCALE", "BLANK", "DATAMIN", "DATAMAX"):
            hdr.remove(key, ignore_missing=True, remove_all=True)
        for change in job.info.changes:
            hdr.add_history(f"changehdr: {change}"[:72])
        hdr["BUNIT"] = ("ADU", "bias, scaled dark and flat removed")
        hdr["EGAINRAW"] = (round(gain, 6), f"[e-/ADU] raw gain ({gain_src})"[:47])
        hdr["EGAIN"] = (round(egain, 6), "[e-/ADU] this image: raw gain x median flat")
        hdr["RDNOISE"] = (round(rn_adu * gain, 4), "[e-] read noise")
        hdr["SATRAW"] = (sat_raw, "[ADU] raw saturation level used")
        hdr["SATURATE"] = (round(sat_red, 2), "[ADU] conservative saturation of this image")
        hdr["SKYLEVEL"] = (round(sky, 3), "[ADU] median sky used for the weight map")
        for ref, kw in ((job.bias, "BIAS"), (job.dark, "DARK"), (job.flat, "FLAT")):
            hdr[f"{kw}FILE"] = (ref.path.name[:68], f"master {ref.kind} used")
            hdr[f"{kw}DATE"] = (f"{ref.date[:4]}-{ref.date[4:6]}-{ref.date[6:]}", f"date of the master {ref.kind}")
            hdr[f"{kw}BORR"] = (bool(ref.borrowed), f"master {ref.kind} borrowed from the archive")
        hdr["DARKEXP"] = (float(job.dark.exptime), "[s] exposure time of the master dark")
        hdr["DARKSCAL"] = (round(scale, 6), "dark scale factor EXPTIME / DARKEXP")
        borrowed = [r.kind for r in (job.bias, job.dark, job.flat) if r.borrowed]
        hdr["CALBORR"] = (",".join(borrowed) or "none", "masters borrowed from the archive")
        for ref in (r for r in (job.bias, job.dark, job.flat) if r.borrowed):
            hdr.add_history(f"borrowed {ref.kind}: {ref.describe()}"[:72])
        hdr["CRDETECT"] = (bool(self.settings.cosmic_rays), "cosmic rays detected (astroscrappy)")
        hdr["TRDETECT"] = (bool(self.settings.satellite_trails), "satellite trails detected (Hough)")
        hdr["NBADPIX"] = (int(counts["bad"]), "pixels flagged BAD")
        hdr["NSATPIX"] = (int(counts["saturated"]), "pixels flagged SATURATED")
        hdr["NCRPIX"] = (int(counts["cosmic_ray"]), "pixels flagged COSMIC_RAY")
        hdr["NTRAIL"] = (len(trail_list), "trails found")
        hdr["NTRLPIX"] = (int(counts["trail"]), "pixels flagged TRAIL")
        hdr["CALBACK"] = (backend_name(self.xp), "array backend of the calibration")
        if self.run_id:
            hdr["CALRUNID"] = (self.run_id, "night-ready message that produced this frame")
        return hdr


def check_signal(path: str, raw: np.ndarray) -> None:
    """Refuse a raw frame without image data: no finite pixel, or every pixel the same value.

    Raises
    ------
    BadInputError
        With the reason (such a frame would otherwise give NaN statistics downstream).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        lo, hi = (float(np.nanmin(raw)), float(np.nanmax(raw))) if raw.size else (np.nan, np.nan)
    if not (np.isfinite(lo) or np.isfinite(hi)):
        raise BadInputError(path, "no finite pixel value (the frame is all NaN/Inf)")
    if lo == hi:
        raise BadInputError(path, f"every pixel has the value {lo:g} ADU: the frame holds no image")


def mean_date_mjd(m: Master) -> float:
    """Mean DATE-OBS of a new master's inputs, MJD."""
    from astropy.time import Time

    return float(Time(m.date_obs, format="isot", scale="utc").mjd)


def _write_image(path: Path, data: np.ndarray, header: fits.Header) -> fits.Header:
    """Write ``data`` (big-endian, so written without a byte swap) with ``header`` to ``path``
    (a temporary name from :func:`gppy.fitsio.atomic_path`); returns the header as written."""
    hdul = fits.HDUList([fits.PrimaryHDU(data=data, header=header)])
    hdul.writeto(path, overwrite=True, output_verify="silentfix")
    return hdul[0].header


def _patch_pixels(path: Path, header: fits.Header, data: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> None:
    """Copy ``data[ys, xs]`` into the file written by :func:`_write_image` (in place)."""
    if ys.size == 0:
        return
    offset = len(header.tostring(padding=True))
    mm = np.memmap(path, dtype=data.dtype, mode="r+", offset=offset, shape=data.shape)
    try:
        mm[ys, xs] = data[ys, xs]        # into the page cache, like write(); no msync (it would
    finally:                             # wait for the whole file to reach the disk)
        del mm


def _patch_header(path: Path, header: fits.Header, final: fits.Header, keys: tuple[str, ...],
                  data: np.ndarray) -> None:
    """Give the keywords ``keys`` of the file written by :func:`_write_image` their values in
    ``final``; the header keeps its size, else the file is written again."""
    new = header.copy()
    for key in keys:
        new[key] = (final[key], final.comments[key])
    block = new.tostring(padding=True).encode("ascii")
    if len(block) != len(header.tostring(padding=True)):
        _write_image(path, data, final)
        return
    with open(path, "r+b") as fh:
        fh.write(block)
