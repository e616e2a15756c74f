"""File I/O of the calibration stage: raw frames as read-only row sources, master files.

Master file format: the primary HDU holds the master (float32) and its header; an image
extension ``ERR`` holds the 1-sigma error image (float32, same units). Masters written by v1
have no ``ERR`` extension: their error is taken as 0 (and said so in the log).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from astropy.io import fits

from gppy.fitsio import BadInputError, atomic_path, fits_size, read_header

log = logging.getLogger(__name__)

_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class RawImage:
    """A raw FITS image opened read-only as a memory map; slicing returns float32 ADU.

    ``RawImage(path)[r0:r1]`` reads only those rows (BSCALE/BZERO applied). The file is
    never written: the map is opened with ``mode="r"``.

    Raises
    ------
    BadInputError
        If the file is unreadable, not a 2-D image, or shorter than its header promises.
    """

    def __init__(self, path: str | Path, header: fits.Header | None = None):
        self.path = Path(path)
        header = header if header is not None else read_header(self.path)
        if int(header.get("NAXIS", 0)) != 2:
            raise BadInputError(self.path, f"expected a 2-D image, NAXIS={header.get('NAXIS', 0)}")
        bitpix = int(header.get("BITPIX", 0))
        if bitpix not in _DTYPES:
            raise BadInputError(self.path, f"unsupported BITPIX {bitpix}")
        self.shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        size = self.path.stat().st_size
        if size < fits_size(header):
            raise BadInputError(self.path, f"truncated: {size} bytes, header needs {fits_size(header)}")
        try:
            with fits.open(self.path, memmap=False, lazy_load_hdus=True) as hdul:
                offset = int(hdul.fileinfo(0)["datLoc"])
        except Exception as exc:
            raise BadInputError(self.path, f"not a readable FITS file ({exc})") from exc
        self._bscale = float(header.get("BSCALE", 1.0))
        self._bzero = float(header.get("BZERO", 0.0))
        self._mm = np.memmap(self.path, dtype=_DTYPES[bitpix], mode="r", offset=offset, shape=self.shape)

    def __getitem__(self, key) -> np.ndarray:
        out = np.asarray(self._mm[key], dtype=np.float32)
        if self._bscale != 1.0:
            out *= np.float32(self._bscale)
        if self._bzero != 0.0:
            out += np.float32(self._bzero)
        return out

    def read(self) -> np.ndarray:
        """The whole image, float32 ADU."""
        try:
            return self[:, :]
        except (OSError, ValueError) as exc:
            raise BadInputError(self.path, f"cannot read the data unit ({exc})") from exc


def write_master(dest: Path, data: np.ndarray, error: np.ndarray, header: fits.Header) -> Path:
    """Write a master (primary: data; extension ``ERR``: error) atomically."""
    err_hdr = fits.Header()
    err_hdr["BUNIT"] = header.get("BUNIT", "")
    err_hdr["COMMENT"] = "1-sigma error of the primary image"
    hdul = fits.HDUList([fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=header),
                         fits.ImageHDU(np.asarray(error, dtype=np.float32), header=err_hdr, name="ERR")])
    with atomic_path(dest) as tmp:
        hdul.writeto(tmp, overwrite=True, output_verify="silentfix")
    return Path(dest)


def read_master(path: Path) -> tuple[np.ndarray, np.ndarray, fits.Header]:
    """``(data, error, header)`` of a master file (error 0 when it has no ``ERR`` extension)."""
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header.copy()
            data = np.asarray(hdul[0].data, dtype=np.float32)
            if "ERR" in hdul:
                error = np.asarray(hdul["ERR"].data, dtype=np.float32)
            else:
                log.info("%s has no ERR extension (a v1 master?): its error is taken as 0", path)
                error = np.zeros_like(data)
    except Exception as exc:
        raise BadInputError(path, f"cannot read master frame ({exc.__class__.__name__}: {exc})") from exc
    if data.ndim != 2 or error.shape != data.shape:
        raise BadInputError(path, f"master frame has shape {data.shape} / error {error.shape}")
    return data, error, header


def list_masters(folder: Path) -> list[Path]:
    """FITS files directly in an archive folder (not ``rejected/``), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".fits")
                  and not p.name.startswith("."))
