"""The FFT functions that go with an array backend.

The engine calls only ``rfft2`` and ``irfft2`` (with ``s=`` and ``axes=``), whose signatures
are the same in ``scipy.fft`` and ``cupyx.scipy.fft``. For NumPy arrays ``scipy.fft`` is used
rather than ``numpy.fft``: on the 2-core reference machine its forward real FFT of a stack of
256x256 float32 tiles is 3.5x faster, and it keeps single precision. For CuPy arrays the
cuFFT-backed ``cupyx.scipy.fft`` is used. Either way the engine's code is identical.
"""

from __future__ import annotations

import os
from types import ModuleType

from gppy.xp import backend_name


class _HostFFT:
    """``scipy.fft`` with the worker count fixed (all cores of this process)."""

    def __init__(self, workers: int):
        import scipy.fft

        self._fft = scipy.fft
        self.workers = workers

    def rfft2(self, a, s=None, axes=(-2, -1)):
        return self._fft.rfft2(a, s=s, axes=axes, workers=self.workers)

    def irfft2(self, a, s=None, axes=(-2, -1)):
        return self._fft.irfft2(a, s=s, axes=axes, workers=self.workers)


def fft_for(xp: ModuleType):
    """An object with ``rfft2`` and ``irfft2`` for arrays of backend ``xp``.

    Parameters
    ----------
    xp : module
        ``numpy`` or ``cupy`` (from :func:`gppy.xp.get_xp`).
    """
    if backend_name(xp) == "cupy":
        import cupyx.scipy.fft as cufft  # type: ignore[import-not-found]

        return cufft
    return _HostFFT(workers=max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                else (os.cpu_count() or 1)))
