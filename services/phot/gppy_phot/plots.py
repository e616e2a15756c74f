"""The zero-point diagnostic figure (v1-behaviour.md §7.2 item 13).

v1 wrote seven PNGs per image (``<stem>.<MAGKEY>.png``); here one PNG holds the seven panels
(``<stem>.zp.png``), each as v1 drew it: the zp of every ZP star against its reference
magnitude, kept stars as dots and clipped ones as crosses, the ZP line with the per-star
scatter band and the (narrower) ZP error band, grey outside [MAGLOW, MAGUP], y range ZP +- 0.25.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gppy_phot.apertures import SUFFIXES
from gppy_phot.zeropoint import MAG_LOW, MAG_UP, ZeroPoint


def zp_figure_png(zp_inputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                  zps: dict[str, ZeroPoint], title: str, dpi: int = 80) -> bytes:
    """PNG bytes of the ZP diagnostic.

    Parameters
    ----------
    zp_inputs : dict
        ``suffix -> (ref_mag, zp_i, kept)`` of the ZP stars (mag, mag, bool).
    zps : dict
        ``suffix -> ZeroPoint``.
    title : str
        Figure title (the image name).
    """
    fig = Figure(figsize=(14, 6.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4).ravel()
    for ax, s in zip(axes, SUFFIXES, strict=False):
        z = zps.get(s)
        if z is None or s not in zp_inputs:
            ax.set_visible(False)
            continue
        mag, zpi, kept = zp_inputs[s]
        ax.axvspan(5, MAG_LOW, color="0.85")
        ax.axvspan(MAG_UP, 25, color="0.85")
        ax.axhspan(z.zp - z.scatter, z.zp + z.scatter, color="tab:blue", alpha=0.15, lw=0)
        ax.axhspan(z.zp - z.ezp, z.zp + z.ezp, color="tab:blue", alpha=0.35, lw=0)
        ax.axhline(z.zp, color="tab:blue", lw=1)
        ax.plot(mag[kept], zpi[kept], ".", color="k", ms=3, label=f"kept ({int(kept.sum())})")
        ax.plot(mag[~kept], zpi[~kept], "x", color="tab:red", ms=4, label=f"clipped ({int((~kept).sum())})")
        lo = min(10.0, float(np.nanmin(mag)) - 0.2) if len(mag) else 10.0
        hi = max(20.0, float(np.nanmax(mag)) + 0.2) if len(mag) else 20.0
        ax.set_xlim(lo, hi)
        ax.set_ylim(z.zp - 0.25, z.zp + 0.25)
        ax.set_title(f"MAG_{s}: ZP={z.zp:.3f}±{z.ezp:.3f} (σ={z.scatter:.3f})", fontsize=9)
        ax.set_xlabel("reference mag", fontsize=8)
        ax.set_ylabel("ZP", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.07, top=0.92, wspace=0.28, hspace=0.35)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
