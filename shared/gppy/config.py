"""Configuration: v1's ``path.json`` plus typed settings.

``path.json`` keeps v1's keys and defaults (v1-behaviour.md §1.1): only ``path_base`` is
required; blank or missing keys fall back to paths derived from it. Everything else
(thresholds, engines, the NATS URL, credentials) is a :class:`Settings` field, overridable by
``GPPY_*`` environment variables.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class PathConfig(BaseModel):
    """Data roots, as v1's ``path.json`` defines them (all absolute after loading)."""

    path_base: Path
    path_obsdata: Path | None = None
    path_processed: Path | None = None
    path_refcat: Path | None = None
    path_ref_scamp: Path | None = None
    path_log: Path | None = None
    ref_frame: Path | None = None
    path_mframe: Path | None = None
    path_scratch: Path | None = None
    skygrid: Path | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_default(cls, value):
        """v1: a blank value means "use the default" (not the current directory)."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> PathConfig:
        base = Path(os.path.abspath(self.path_base))
        self.path_base = base
        defaults = {
            "path_obsdata": base.parent / "obsdata",
            "path_processed": base.parent / "processed_1x1_gain2750",
            "path_refcat": base / "ref_cat",
            "path_ref_scamp": base / "ref_scamp",
            "path_log": base / "log",
            "ref_frame": base / "ref_frame",
            "path_mframe": base / "master_frame_1x1_gain2750",
            "path_scratch": base / "scratch",
        }
        for key, default in defaults.items():
            value = getattr(self, key)
            if value is None or str(value).strip() == "":
                setattr(self, key, default)
            else:
                setattr(self, key, Path(os.path.abspath(value)))
        return self

    @classmethod
    def load(cls, path: str | os.PathLike) -> PathConfig:
        """Read a v1 ``path.json``; unknown keys (``_comment``, ``tile``) are ignored."""
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{p}: cannot read path configuration: {exc}") from exc
        if not raw.get("path_base"):
            raise ValueError(f"{p}: 'path_base' is required")
        known = {k: v for k, v in raw.items() if k in cls.model_fields}
        return cls(**known)

    def roots(self) -> list[Path]:
        """Every configured data root: a message may only name paths below one of these."""
        keys = ["path_base", "path_obsdata", "path_processed", "path_refcat", "path_ref_scamp",
                "path_log", "ref_frame", "path_mframe", "path_scratch"]
        return [Path(getattr(self, k)) for k in keys]

    def unit_log(self, unit: str) -> Path:
        """v1's per-unit run log ``<path_log>/<unit>.log`` (CSV ``date,start,end,note``)."""
        return Path(self.path_log) / f"{unit.lower()}.log"


class Settings(BaseSettings):
    """Typed settings of every service; each field is overridable as ``GPPY_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="GPPY_", extra="ignore")

    config: Path | None = Field(None, description="path.json; also read from GPPY_CONFIG")
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: str | None = None
    nats_password_file: Path | None = None
    stream: str = "GPPY"
    subject_prefix: str = "gppy"
    max_deliver: int = 4
    ack_wait_s: float = 60.0
    heartbeat_s: float = 15.0
    concurrency: int = 1
    max_message_bytes: int = 900_000  # under nats-server's default 1 MiB payload limit
    http_host: str = "0.0.0.0"
    http_port: int = 0
    api_token: str | None = None
    api_token_file: Path | None = None
    log_json: bool = True
    #: A data root with less free space than this (MB) counts as full: services stop taking
    #: messages and hold the one they are on until space is back (0 disables the check).
    min_free_mb: float = 100.0
    gpu: Literal["auto", "on", "off"] = "auto"

    # calibration
    clip_sigma: float = 3.0
    clip_iters: int = 5
    combine_band_rows: int = 512
    master_qc_threshold: float = 0.05
    cosmic_rays: bool = True
    satellite_trails: bool = True
    saturate_adu: float = 60000.0
    # astrometry
    scamp_position_maxerr_arcmin: float = 6.0
    scamp_posangle_maxerr_deg: float = 3.0
    astrometry_min_stars: int = 15
    astrometry_max_rms_arcsec: float = 0.3
    # stacking
    visit_gap_s: float = 300.0
    stack_size: tuple[int, int] = (10200, 6800)
    pixel_scale: float = 0.505
    # subtraction
    subtract_engine: Literal["native", "hotpants", "auto"] = "native"
    subtract_nregions: tuple[int, int] = (3, 2)
    subtract_convolve: Literal["auto", "reference", "science"] = "auto"  # which image is convolved
    subtract_singles: bool = False
    #: Move the catalogue stars that moved between the reference's and the science's epochs
    #: (proper motion) in the reference before subtracting.
    subtract_move_stars: bool = True
    # photometry
    match_radius_arcsec: float = 1.0
    phot_snr_min: float = 5.0            # PSF S/N of a transient candidate
    phot_snr_min_negative: float = 7.0   # PSF S/N of a negative (fading) candidate
    phot_rb_min: float = 0.9             # least vetting (real/bogus) score of a candidate
    phot_rb_min_high_snr: float = 0.3    # ... of a candidate of PSF S/N >= 10
    phot_vetting_model: bool = True      # trained vetting score; False: v1's flags + shape score
    phot_detect_sigma: float = 3.5       # Source Extractor detection significance on differences
    # watcher
    units: list[str] = Field(default_factory=lambda: ["7DT01"])
    quiet_period_s: float = 30.0
    poll_interval_s: float = 10.0
    process_test_nights: bool = False
    night_max_attempts: int = 3
    night_stall_timeout_s: float = 1800.0
    night_incomplete_grace_s: float = 600.0  # unchanged this long, incomplete FITS files no longer hold a night
    night_patterns: dict[str, str] | None = None  # {"survey"|"too"|"test": regex} overrides
    slack_channel: str = "#pipeline"
    slack_token: str | None = None
    slack_token_file: Path | None = None
    slack_base_url: str | None = None
    keys_file: Path | None = None

    def paths(self) -> PathConfig:
        """The data roots from ``config`` (or ``GPPY_CONFIG``)."""
        cfg = self.config or os.environ.get("GPPY_CONFIG")
        if not cfg:
            raise ValueError("no path.json: pass --config or set GPPY_CONFIG")
        return _load_paths(str(cfg))

    def secret(self, name: str) -> str | None:
        """A secret from ``<name>`` or the file named by ``<name>_file`` (compose secrets)."""
        value = getattr(self, name)
        if value:
            return value
        fpath = getattr(self, f"{name}_file", None)
        if fpath and Path(fpath).exists():
            return Path(fpath).read_text().strip()
        return None


@lru_cache(maxsize=8)
def _load_paths(path: str) -> PathConfig:
    return PathConfig.load(path)


def load_settings(**overrides) -> Settings:
    """Settings: explicit overrides (CLI) > ``GPPY_*`` environment > the optional ``settings``
    object of path.json > defaults."""
    explicit = {k: v for k, v in overrides.items() if v is not None}
    cfg = explicit.get("config") or os.environ.get("GPPY_CONFIG")
    from_file: dict = {}
    if cfg and Path(cfg).exists():
        try:
            from_file = dict(json.loads(Path(cfg).read_text()).get("settings") or {})
        except (OSError, json.JSONDecodeError, AttributeError):
            from_file = {}
    merged = {k: v for k, v in from_file.items()
              if k in Settings.model_fields and f"GPPY_{k.upper()}" not in os.environ}
    merged.update(explicit)
    return Settings(**merged)
