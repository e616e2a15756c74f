"""SWarp runs: one configuration file per run, written into the night's scratch folder.

Choices (v1-behaviour.md §6.1 lists v1's ``7dt.swarp``; these fix B8 and B10):

* ``COMBINE_TYPE WEIGHTED``: the inverse-variance weighted mean. v1 took the median, whose
  noise is about 1.25x that of the mean for Gaussian noise (v1's factor 2/3 on the gain) and
  cannot be predicted from the weight maps; outliers (cosmic rays, trails, saturated and bad
  pixels) are already removed by the calibration stage through zero weights, so the median's
  robustness buys nothing here, and the weighted mean gives both the lowest noise and a weight
  map that predicts it (checked in tests/test_stack_products.py).
* ``WEIGHT_TYPE MAP_WEIGHT`` with the singles' ``<stem>.weight.fits`` (inverse variance in
  ADU^-2, 0 where masked) and ``RESCALE_WEIGHTS N``: the weights are absolute and SWarp must
  not rescale them to its own noise estimate. A zero-weight input pixel removes every output
  pixel its resampling kernel touches, so masked pixels never leak into the stack.
* Flux scaling through ``FSCALE_DEFAULT`` (one value per input, with a keyword the inputs do
  not carry, so that SCAMP's FLXSCALE, if present, is ignored); SWarp divides the weights by
  the factor squared.
* ``RESAMPLING_TYPE LANCZOS3`` as v1; the output grid is given exactly by a header file
  (``HEADEROUT_NAME``) built by :func:`gppy_stack.grid.grid_header`.
* ``FSCALASTRO_TYPE VARIABLE`` as v1: the inputs hold counts per pixel, and with the
  field distortion (TPV) their pixel area changes by ~0.5 % from the centre to the corners;
  VARIABLE rescales by the local area ratio so that point-source fluxes are conserved.
  Measured on simulated nights with 1" of corner distortion: FIXED put star fluxes 0.25 %
  high on average with an excess scatter (chi 1.10), VARIABLE 0.04 % low (chi 1.02).
* ``SUBTRACT_BACK Y`` (``BACK_SIZE 512``, ``BACK_FILTERSIZE 3``) as v1.
* ``WEIGHTOUT_NAME`` next to the stack, named after it (v1 wrote ``coadd.weight.fits`` in the
  working directory and overwrote it with every stack: B8); ``RESAMPLE_DIR`` and ``VMEM_DIR``
  in the night's scratch folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from astropy.io import fits

from gppy.fitsio import write_text
from gppy.tools import run_tool

#: Longest file name SWarp 2.41 handles safely (it aborts above about 255 characters).
MAX_PATH = 240
#: A keyword the inputs never carry: switches off header flux scales (SCAMP's FLXSCALE).
NO_FSCALE_KEYWORD = "GPNOFSCL"


@dataclass(frozen=True)
class SwarpOptions:
    """SWarp settings of a stack run (defaults as documented in the module)."""

    combine_type: str = "WEIGHTED"
    resampling_type: str = "LANCZOS3"
    fscalastro_type: str = "VARIABLE"
    subtract_back: bool = True
    back_size: int = 512
    back_filtersize: int = 3
    nthreads: int = 0
    mem_max_mb: int = 4096
    vmem_max_mb: int = 32768
    combine_bufsize_mb: int = 1024
    timeout_s: float = 3600.0
    #: Inputs per SWarp run; more are coadded in chunks and combined (bounds scratch space).
    max_inputs_per_run: int = 12

    @property
    def kernel_radius(self) -> int:
        """Half-width (px) of the resampling kernel: how far one input pixel reaches."""
        t = self.resampling_type.upper()
        if t.startswith("LANCZOS"):
            return int(t[len("LANCZOS"):] or 3)
        return {"NEAREST": 0, "BILINEAR": 1}.get(t, 3)


def _yn(flag: bool) -> str:
    return "Y" if flag else "N"


def swarp_config(*, imageout: Path, weightout: Path, headerout: Path, weights: Sequence[Path],
                 fscales: Sequence[float], gains: Sequence[float], saturates: Sequence[float],
                 resample_dir: Path, options: SwarpOptions) -> dict[str, str]:
    """The SWarp configuration (keyword -> value) of one stack.

    Parameters
    ----------
    imageout, weightout : Path
        Output image and weight map.
    headerout : Path
        Header file that defines the output grid.
    weights : sequence of Path
        One weight map per input, in input order.
    fscales : sequence of float
        Flux factor of each input.
    gains : sequence of float
        e-/ADU of each input (SWarp only uses it for its own GAIN keyword, which the stack
        header replaces).
    saturates : sequence of float
        Saturation level of each input (ADU).
    resample_dir : Path
        Folder for SWarp's resampled frames and swap files (night scratch).
    options : SwarpOptions
    """
    n = len(weights)
    if not (n == len(fscales) == len(gains) == len(saturates)) or n == 0:
        raise ValueError("one weight, flux scale, gain and saturation level per input is needed")

    def join(values: Sequence[float]) -> str:
        return ",".join(f"{float(v):.10g}" for v in values)

    return {
        "IMAGEOUT_NAME": str(imageout),
        "WEIGHTOUT_NAME": str(weightout),
        "HEADEROUT_NAME": str(headerout),
        "HEADER_SUFFIX": ".gppynone",
        "WEIGHT_TYPE": "MAP_WEIGHT",
        "WEIGHT_IMAGE": ",".join(str(w) for w in weights),
        "RESCALE_WEIGHTS": "N",
        "COMBINE": "Y",
        "COMBINE_TYPE": options.combine_type,
        "BLANK_BADPIXELS": "N",
        "CELESTIAL_TYPE": "NATIVE",
        "PROJECTION_TYPE": "TAN",
        "RESAMPLE": "Y",
        "RESAMPLE_DIR": str(resample_dir),
        "RESAMPLING_TYPE": options.resampling_type,
        "OVERSAMPLING": "0",
        "INTERPOLATE": "N",
        "FSCALASTRO_TYPE": options.fscalastro_type,
        "FSCALE_KEYWORD": NO_FSCALE_KEYWORD,
        "FSCALE_DEFAULT": join(fscales),
        "GAIN_KEYWORD": NO_FSCALE_KEYWORD + "G",
        "GAIN_DEFAULT": join(gains),
        "SATLEV_KEYWORD": NO_FSCALE_KEYWORD + "S",
        "SATLEV_DEFAULT": join(saturates),
        "SUBTRACT_BACK": _yn(options.subtract_back),
        "BACK_TYPE": "AUTO",
        "BACK_SIZE": str(options.back_size),
        "BACK_FILTERSIZE": str(options.back_filtersize),
        "VMEM_DIR": str(resample_dir),
        "VMEM_MAX": str(options.vmem_max_mb),
        "MEM_MAX": str(options.mem_max_mb),
        "COMBINE_BUFSIZE": str(options.combine_bufsize_mb),
        "DELETE_TMPFILES": "Y",
        "COPY_KEYWORDS": "OBJECT",
        "WRITE_FILEINFO": "N",
        "WRITE_XML": "N",
        "VERBOSE_TYPE": "NORMAL",
        "NTHREADS": str(options.nthreads),
    }


def config_text(config: dict[str, str]) -> str:
    """SWarp configuration-file text of ``config``."""
    return "".join(f"{key:<20s} {value}\n" for key, value in config.items())


def header_text(header: fits.Header) -> str:
    """An ASCII header file (80-column cards, newline-separated, ``END``) as SWarp reads it."""
    lines = [card.image for card in header.cards]
    return "\n".join(lines + ["END"]) + "\n"


def run_swarp(inputs: Sequence[Path], weights: Sequence[Path], *, grid: fits.Header, imageout: Path,
              weightout: Path, workdir: Path, fscales: Sequence[float], gains: Sequence[float],
              saturates: Sequence[float], options: SwarpOptions | None = None) -> str:
    """Write the run's configuration and grid header into ``workdir`` and run SWarp.

    SWarp 2.41 aborts ("buffer overflow") on file names longer than about 255 characters;
    callers keep ``workdir`` short and pass short (symbolic-link) names for the inputs.
    Returns SWarp's log (stderr). Raises :class:`gppy.tools.ToolError` when SWarp fails.
    """
    options = options or SwarpOptions()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "s.swarp"
    header_path = workdir / "g.head"
    resample_dir = workdir / "r"
    longest = max(len(str(p)) for p in [*inputs, *weights, imageout, weightout, resample_dir / "x.resamp.weight.fits"])
    if longest > MAX_PATH:
        raise ValueError(f"SWarp cannot handle file names of {longest} characters (limit {MAX_PATH})")
    resample_dir.mkdir(parents=True, exist_ok=True)
    write_text(header_path, header_text(grid))
    config = swarp_config(imageout=imageout, weightout=weightout, headerout=header_path, weights=weights,
                          fscales=fscales, gains=gains, saturates=saturates, resample_dir=resample_dir,
                          options=options)
    write_text(config_path, config_text(config))
    proc = run_tool("swarp", ["-c", str(config_path), *[str(p) for p in inputs]], cwd=workdir,
                    timeout=options.timeout_s)
    return proc.stderr
