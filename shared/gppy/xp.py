"""Array backend: the same calibration and subtraction code runs on NumPy or CuPy.

``get_xp("auto")`` returns CuPy when it imports and sees a CUDA device, else NumPy (and logs
why); ``"on"`` requires CuPy; ``"off"`` forces NumPy. Science code takes ``xp`` as a
parameter and uses only functions that both libraries provide.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
_cache: dict[str, ModuleType] = {}


def _cupy_or_reason() -> tuple[ModuleType | None, str]:
    try:
        import cupy  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        return None, f"CuPy not importable ({exc.__class__.__name__})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"no CUDA device ({exc.__class__.__name__})"
    if n < 1:
        return None, "no CUDA device"
    return cupy, f"{n} CUDA device(s)"


def get_xp(gpu: str = "auto") -> ModuleType:
    """NumPy or CuPy according to ``gpu`` (``auto``, ``on``, ``off``)."""
    if gpu in _cache:
        return _cache[gpu]
    if gpu == "off":
        mod: ModuleType = np
    else:
        cp, reason = _cupy_or_reason()
        if cp is None:
            if gpu == "on":
                raise RuntimeError(f"gpu=on but {reason}")
            log.info("array backend: NumPy (%s)", reason)
            mod = np
        else:
            log.info("array backend: CuPy (%s)", reason)
            mod = cp
    _cache[gpu] = mod
    return mod


def backend_name(xp: ModuleType) -> str:
    return "cupy" if xp.__name__.startswith("cupy") else "numpy"


def to_device(xp: ModuleType, a: Any, dtype=None):
    """Copy a host array to the backend (no copy for NumPy when the dtype already matches)."""
    return xp.asarray(a, dtype=dtype)


def to_host(a: Any) -> np.ndarray:
    """A NumPy array from a NumPy or CuPy array."""
    get = getattr(a, "get", None)
    return get() if callable(get) else np.asarray(a)
