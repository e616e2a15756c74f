"""The bad-input corpus: cases made on the fly from a good simulated night.

Every case in ``manifest.json`` names a maker here (``make``) and the outcome it must have
(``expect``). Frame cases add files to the night folder next to the good frames (each with its
own DATE-OBS so that it never joins a good visit); the reference cases remove or damage a
target's reference data; night cases make a night folder of their own. Nothing here is a
stored binary: the bytes come from the night's own raw frames, so the corpus follows the
simulator.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
from astropy.io import fits

HERE = Path(__file__).parent
MANIFEST = HERE / "manifest.json"


def manifest() -> list[dict]:
    """The cases, in order."""
    return json.loads(MANIFEST.read_text())["cases"]


class Maker:
    """Makes the corpus' files for a simulated night (``truth`` is its ``night.json``)."""

    def __init__(self, night_dir: Path, data_root: Path, truth: dict, paths, marker: Path):
        self.night_dir = Path(night_dir)
        self.root = Path(data_root)
        self.truth = truth
        self.paths = paths
        #: A file that only a shell interpreting a header value would create.
        self.marker = Path(marker)
        self.unit = truth["unit"]
        frames = truth["frames"]
        targets = [t["name"] for t in truth["targets"]]
        self.targets = targets
        self.science = [f for f in frames if f["kind"] == "science"]
        self.template = self.night_dir / next(f["file"] for f in self.science if f["object"] == targets[-1])
        self.flat = self.night_dir / next(f["file"] for f in frames if f["kind"] == "flat")
        self._minute = 0

    # ---------------------------------------------------------------- helpers
    def _slot(self) -> tuple[str, str]:
        """A DATE-OBS of its own (three hours after the night's frames) and its name stamp."""
        self._minute += 7
        hh, mm = 4 + self._minute // 60, self._minute % 60
        return f"2025-01-16T{hh:02d}:{mm:02d}:00.000", f"20250116_{hh:02d}{mm:02d}00"

    def _name(self, stamp: str, obj: str = "BAD", filt: str = "r", seq: int = 0) -> str:
        safe = "".join(c if c.isalnum() else "-" for c in obj)[:20] or "X"
        return f"{self.unit}_{stamp}_{safe}_{filt}_1x1_100.0s_{9000 + seq:04d}.fits"

    def _frame(self, edit=None, data=None, obj: str | None = None, filt: str = "r",
               template: Path | None = None) -> tuple[Path, bytes]:
        """A copy of a good science frame with a header edit / other data; (dest, bytes)."""
        with fits.open(template or self.template) as hdul:
            hdr = hdul[0].header.copy()
            img = hdul[0].data.copy() if data is None else data
        date, stamp = self._slot()
        hdr["DATE-OBS"] = date
        for k in ("DATE-LOC", "JD", "MJD"):
            hdr.remove(k, ignore_missing=True)
        if obj is not None:
            hdr["OBJECT"] = obj
        if edit is not None:
            edit(hdr)
        buf = io.BytesIO()
        fits.PrimaryHDU(img, hdr).writeto(buf, output_verify="silentfix")
        return self.night_dir / self._name(stamp, obj or "BAD", filt, self._minute), buf.getvalue()

    def _write(self, dest: Path, data: bytes) -> list[str]:
        dest.write_bytes(data)
        return [str(dest)]

    # ---------------------------------------------------------------- frame cases
    def truncated(self) -> list[str]:
        dest, data = self._frame()
        return self._write(dest, data[: int(len(data) * 0.6)])

    def zero_bytes(self) -> list[str]:
        dest, _ = self._frame()
        return self._write(dest, b"")

    def not_fits(self) -> list[str]:
        dest, _ = self._frame()
        return self._write(dest, b"this is a log file, not a FITS image\n" * 200)

    def _drop(self, key: str) -> list[str]:
        dest, data = self._frame(edit=lambda h: h.remove(key))
        return self._write(dest, data)

    def no_imagetyp(self) -> list[str]:
        return self._drop("IMAGETYP")

    def no_exptime(self) -> list[str]:
        dest, data = self._frame(edit=lambda h: [h.remove("EXPTIME"), h.remove("EXPOSURE")])
        return self._write(dest, data)

    def no_filter(self) -> list[str]:
        return self._drop("FILTER")

    def no_date_obs(self) -> list[str]:
        return self._drop("DATE-OBS")

    def text_exptime(self) -> list[str]:
        def edit(h):
            h["EXPTIME"] = "one hundred"
            h["EXPOSURE"] = "one hundred"
        dest, data = self._frame(edit=edit)
        return self._write(dest, data)

    def nan_frame(self) -> list[str]:
        shape = fits.getdata(self.template).shape

        def edit(h):
            for k in ("BZERO", "BSCALE"):
                h.remove(k, ignore_missing=True)
        dest, data = self._frame(edit=edit, data=np.full(shape, np.nan, np.float32))
        return self._write(dest, data)

    def zero_frame(self) -> list[str]:
        shape = fits.getdata(self.template).shape
        dest, data = self._frame(data=np.zeros(shape, np.uint16))
        return self._write(dest, data)

    def zero_flat(self) -> list[str]:
        shape = fits.getdata(self.flat).shape
        with fits.open(self.flat) as hdul:
            hdr = hdul[0].header.copy()
        date = str(hdr["DATE-OBS"])
        hdr["DATE-OBS"] = date[:17] + f"{(int(date[17:19]) + 20) % 60:02d}" + date[19:]
        buf = io.BytesIO()
        fits.PrimaryHDU(np.zeros(shape, np.uint16), hdr).writeto(buf)
        dest = self.night_dir / self.flat.name.replace("_0000.fits", "_0099.fits")
        return self._write(dest, buf.getvalue())

    def wrong_size(self) -> list[str]:
        with fits.open(self.template) as hdul:
            small = hdul[0].data[: hdul[0].data.shape[0] // 2, : hdul[0].data.shape[1] // 2].copy()
        dest, data = self._frame(data=small)
        return self._write(dest, data)

    def object_metacharacters(self) -> list[str]:
        value = f"../x/ y'\"; touch {self.marker}; $(touch {self.marker})`touch {self.marker}`"
        dest, data = self._frame(obj=value[:68])
        return self._write(dest, data)

    def filter_metacharacters(self) -> list[str]:
        dest, data = self._frame(edit=lambda h: h.__setitem__("FILTER", "r/../ '$(id)'"))
        return self._write(dest, data)

    def non_ascii_header(self) -> list[str]:
        dest, data = self._frame(obj="NONASCIIQ")
        raw = bytearray(data)
        i = raw.find(b"NONASCIIQ")
        raw[i + 8:i + 9] = "é".encode("latin-1")
        return self._write(dest, bytes(raw))

    def duplicate_names(self) -> list[str]:
        """The same exposure twice: ``<name>.fits`` and ``<name>.fit`` (one product name)."""
        dest, data = self._frame()
        a = self._write(dest, data)
        b = self._write(dest.with_suffix(".fit"), data)
        return a + b

    # ---------------------------------------------------------------- reference cases
    def _target(self, k: int) -> str:
        return self.targets[k]

    def missing_catalogue(self) -> list[str]:
        """Target 0 loses its reference catalogue (CSV and SCAMP copy)."""
        obj = self._target(0)
        for p in [Path(self.paths.path_refcat) / f"gaiaxp_dr3_synphot_{obj}.csv",
                  Path(self.paths.path_ref_scamp) / f"{obj}.fits"]:
            p.unlink(missing_ok=True)
        return [obj]

    def missing_reference_image(self) -> list[str]:
        """Target 1 loses every reference image (7DT deep stack and survey image)."""
        obj = self._target(1)
        for p in Path(self.paths.ref_frame).rglob(f"*_{obj}_*"):
            p.unlink()
        return [obj]

    def no_proper_motions(self) -> list[str]:
        """Target 2's catalogue has no proper motion or parallax at all (blank columns)."""
        obj = self._target(2)
        src = Path(self.paths.path_refcat) / f"gaiaxp_dr3_synphot_{obj}.csv"
        rows = list(csv.DictReader(src.open()))
        cols = list(rows[0])
        for r in rows:
            r["pmra"] = r["pmdec"] = r["parallax"] = ""
        out = io.StringIO()
        w = csv.DictWriter(out, cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        src.write_text(out.getvalue())
        (Path(self.paths.path_ref_scamp) / f"{obj}.fits").unlink(missing_ok=True)
        return [obj]

    # ---------------------------------------------------------------- night cases
    def calibration_only_night(self) -> list[str]:
        """Another night of the same unit with only its bias, dark and flat frames."""
        dest = self.night_dir.parent / "2025-01-14_gain2750"
        dest.mkdir()
        for f in self.truth["frames"]:
            if f["kind"] != "science":
                shutil.copy2(self.night_dir / f["file"], dest / f["file"])
        return [str(dest)]

    def no_calibration_empty_archive(self) -> list[str]:
        """A night of a second unit (no master archive at all) with science frames only."""
        dest = self.night_dir.parent.parent / "7DT02" / self.night_dir.name
        dest.mkdir(parents=True)
        for f in self.science[:2]:
            shutil.copy2(self.night_dir / f["file"], dest / f["file"].replace(self.unit, "7DT02"))
        return [str(dest)]
