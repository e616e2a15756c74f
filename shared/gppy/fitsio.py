"""FITS helpers shared by every stage: atomic writes and safe reads.

Every product is written to a temporary name in the destination folder and renamed into
place (``os.replace``), so a reader never sees a half-written file under its final name, and
re-running a message simply replaces the product with an identical one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from astropy.io import fits


def _file_mode() -> int:
    """Permissions of a new product: 0666 less the process umask (``mkstemp`` gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


class BadInputError(ValueError):
    """An input file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` on success.

    The temporary file is removed if the block raises. The folder is created if missing.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_fits(dest: str | Path, data: np.ndarray | None, header: fits.Header | None = None,
               extra_hdus: list[fits.ImageHDU | fits.BinTableHDU] | None = None) -> Path:
    """Write ``data`` with ``header`` to ``dest`` atomically. Returns ``dest``."""
    hdul = fits.HDUList([fits.PrimaryHDU(data=data, header=header)] + list(extra_hdus or []))
    with atomic_path(dest) as tmp:
        hdul.writeto(tmp, overwrite=True, output_verify="silentfix")
    return Path(dest)


def write_mask(dest: str | Path, mask: np.ndarray, header: fits.Header | None = None) -> Path:
    """Write a :class:`gppy.masks.MaskBit` mask as int16 (BITPIX 16, no BZERO).

    uint16 would need BZERO = 32768, which Source Extractor ignores for FLAG_IMAGEs (every
    IMAFLAGS_ISO would then carry bit 15); the bits in use fit in 15 bits.
    """
    m = np.asarray(mask)
    if m.size and int(m.max()) > 0x7FFF:
        raise ValueError(f"{dest}: mask value {int(m.max())} does not fit the 15 mask bits")
    hdr = fits.Header() if header is None else header.copy()
    for key in ("BZERO", "BSCALE"):
        hdr.remove(key, ignore_missing=True)
    return write_fits(dest, m.astype(np.int16), hdr)


def write_text(dest: str | Path, text: str) -> Path:
    """Write a text product atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def read_header(path: str | Path) -> fits.Header:
    """Primary header of ``path``; raises :class:`BadInputError` with the reason."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(p, "file does not exist")
    if p.stat().st_size == 0:
        raise BadInputError(p, "file is empty (0 bytes)")
    try:
        with fits.open(p, memmap=False, lazy_load_hdus=True) as hdul:
            return hdul[0].header.copy()
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError...
        raise BadInputError(p, f"not a readable FITS file ({exc.__class__.__name__}: {exc})") from exc


def read_image(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, fits.Header]:
    """Primary image and header; checks the data unit is complete and 2-D."""
    p = Path(path)
    header = read_header(p)
    naxis = header.get("NAXIS", 0)
    if naxis != 2:
        raise BadInputError(p, f"expected a 2-D image, NAXIS={naxis}")
    expected = fits_size(header)
    if p.stat().st_size < expected:
        raise BadInputError(p, f"truncated: {p.stat().st_size} bytes, header needs {expected}")
    try:
        with fits.open(p, memmap=False) as hdul:
            data = np.asarray(hdul[0].data, dtype=dtype)
    except Exception as exc:
        raise BadInputError(p, f"cannot read the data unit ({exc})") from exc
    return data, header


def fits_size(header: fits.Header) -> int:
    """Bytes that a single-HDU FITS file with ``header`` occupies (header + padded data)."""
    header_bytes = (len(header) + 1) * 80
    header_bytes = -(-header_bytes // 2880) * 2880
    nbytes = abs(int(header.get("BITPIX", 8))) // 8
    npix = 1
    for i in range(1, int(header.get("NAXIS", 0)) + 1):
        npix *= int(header.get(f"NAXIS{i}", 0))
    if int(header.get("NAXIS", 0)) == 0:
        npix = 0
    data_bytes = -(-(npix * nbytes) // 2880) * 2880
    return header_bytes + data_bytes


def is_complete_fits(path: str | Path) -> bool:
    """True when the file's primary header parses and its data unit is fully present."""
    try:
        header = read_header(path)
    except BadInputError:
        return False
    return Path(path).stat().st_size >= fits_size(header)
