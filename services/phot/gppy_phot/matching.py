"""Nearest-neighbour matching on the sky (unit vectors and a k-d tree)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """(n, 3) unit vectors of positions in degrees."""
    ra = np.deg2rad(np.asarray(ra_deg, float))
    dec = np.deg2rad(np.asarray(dec_deg, float))
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def match_sky(ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray,
              radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """For every position of list 1, its nearest neighbour in list 2 within ``radius_arcsec``.

    Non-finite positions in either list never match.

    Returns
    -------
    index : numpy.ndarray of int
        Index into list 2, or -1 where there is no neighbour within the radius.
    sep_arcsec : numpy.ndarray of float
        Separation (arcsec), NaN where unmatched.
    """
    n1 = len(np.atleast_1d(ra1))
    index = np.full(n1, -1, dtype=np.int64)
    sep = np.full(n1, np.nan)
    ok1 = np.isfinite(ra1) & np.isfinite(dec1)
    ok2 = np.flatnonzero(np.isfinite(ra2) & np.isfinite(dec2))
    if n1 == 0 or ok1.sum() == 0 or len(ok2) == 0:
        return index, sep
    tree = cKDTree(unit_vectors(np.asarray(ra2)[ok2], np.asarray(dec2)[ok2]))
    chord = 2.0 * np.sin(np.deg2rad(radius_arcsec / 3600.0) / 2.0)
    dist, j = tree.query(unit_vectors(np.asarray(ra1)[ok1], np.asarray(dec1)[ok1]), k=1,
                         distance_upper_bound=chord)
    found = np.isfinite(dist)
    rows = np.flatnonzero(ok1)
    index[rows[found]] = ok2[j[found]]
    sep[rows[found]] = np.rad2deg(2.0 * np.arcsin(np.clip(dist[found] / 2.0, 0, 1))) * 3600.0
    return index, sep


def match_pixels(x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                 radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest neighbour in list 2 of each pixel position of list 1 within ``radius_px``.

    Returns (index or -1, distance in px or NaN).
    """
    n1 = len(np.atleast_1d(x1))
    index = np.full(n1, -1, dtype=np.int64)
    dist_out = np.full(n1, np.nan)
    if n1 == 0 or len(np.atleast_1d(x2)) == 0:
        return index, dist_out
    tree = cKDTree(np.column_stack([x2, y2]))
    dist, j = tree.query(np.column_stack([x1, y1]), k=1, distance_upper_bound=radius_px)
    found = np.isfinite(dist)
    index[found] = j[found]
    dist_out[found] = dist[found]
    return index, dist_out
