"""Small vectorised pixel helpers: stamps around many positions at once."""

from __future__ import annotations

import numpy as np


def stamps(image: np.ndarray, x: np.ndarray, y: np.ndarray, half: int,
           fill: float = np.nan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, m, m) stamps (m = 2 half + 1) around the 0-based positions (x, y), rounded to the
    nearest pixel, with ``fill`` outside the image; also the offsets (dx, dy) of every stamp
    pixel from the exact position.

    Parameters
    ----------
    image : 2-D array
    x, y : arrays of float
        0-based pixel positions.
    half : int
        Stamp half-size (px).
    fill : float
        Value of pixels outside the image.
    """
    ny, nx = image.shape
    x = np.atleast_1d(np.asarray(x, float))
    y = np.atleast_1d(np.asarray(y, float))
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    off = np.arange(-half, half + 1)
    yy = iy[:, None, None] + off[None, :, None]
    xx = ix[:, None, None] + off[None, None, :]
    inside = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
    vals = np.where(inside, np.asarray(image)[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)], fill)
    dx = xx - x[:, None, None]
    dy = yy - y[:, None, None]
    return vals.astype(np.float64), np.broadcast_to(dx, vals.shape), np.broadcast_to(dy, vals.shape)
