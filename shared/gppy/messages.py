"""Message schemas: one pydantic model per pipeline event.

Every message carries ``schema_version``, ``kind``, ``night_id``, ``unit``, ``lane`` (``too``
or ``survey``; ToO work overtakes survey work in every stage) and file-system paths. A
message's subject is ``<prefix>.<lane>.<kind>`` and its NATS message id is derived from its
content, so a retried publish is de-duplicated by JetStream.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = 1
Lane = Literal["too", "survey"]


class MessageError(ValueError):
    """A message that a service must refuse (dead-lettered with this reason)."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    kind: str
    night_id: str
    unit: str
    lane: Lane = "survey"
    run: int = 0
    created: str = Field(default_factory=_now)

    def subject(self, prefix: str = "gppy") -> str:
        return f"{prefix}.{self.lane}.{self.kind}"

    def paths(self) -> list[str]:
        """Every path this message names (checked against the data roots)."""
        out: list[str] = []
        for name, value in self:
            if name.endswith(("path", "_dir")) and isinstance(value, str) and value:
                out.append(value)
            elif name.endswith("paths") and isinstance(value, list):
                out.extend(v for v in value if isinstance(v, str))
        return out

    def msg_id(self) -> str:
        """Content hash without the creation time: the same event twice has the same id.

        ``run`` is part of the content, so a re-run of a night (a new night-ready attempt) is
        not swallowed by JetStream's de-duplication window."""
        body = self.model_dump(exclude={"created"})
        return f"{self.kind}:{hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]}"

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class NightReady(Event):
    """watcher -> calib: a night folder is complete and may be processed."""

    kind: Literal["night.ready"] = "night.ready"
    night_dir: str
    attempt: int = 1
    targets: list[str] | None = None
    filters: list[str] | None = None


class PlannedFrame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    raw_path: str
    calib_path: str
    object: str
    filter: str
    exptime: float
    date_obs: str
    visit: str


class NightPlan(Event):
    """calib -> stack, watcher: the night's science frames and the visits to expect."""

    kind: Literal["night.plan"] = "night.plan"
    night_dir: str
    frames: list[PlannedFrame]
    rejected: dict[str, str] = Field(default_factory=dict)
    borrowed: dict[str, str] = Field(default_factory=dict)


class FrameCalibrated(Event):
    """calib -> astrometry: one reduced science frame with its weight and mask.

    ``ok=False`` (with ``reason``) reports a planned frame that could not be reduced; the
    astrometry stage forwards it as a failed ``frame.solved`` so that its visit does not wait.
    """

    kind: Literal["frame.calibrated"] = "frame.calibrated"
    path: str
    weight_path: str
    mask_path: str
    raw_path: str
    object: str
    filter: str
    exptime: float
    date_obs: str
    visit: str
    ok: bool = True
    reason: str = ""


class FrameSolved(Event):
    """astrometry -> stack, phot: a frame with its WCS written (or a definitive failure)."""

    kind: Literal["frame.solved"] = "frame.solved"
    path: str
    weight_path: str
    mask_path: str
    object: str
    filter: str
    exptime: float
    date_obs: str
    visit: str
    ok: bool = True
    reason: str = ""
    nstars: int = 0
    rms_arcsec: float = 0.0


class StackDone(Event):
    """stack -> subtract, phot: a visit's coadd on the tile grid."""

    kind: Literal["stack.done"] = "stack.done"
    path: str
    weight_path: str
    mask_path: str
    object: str
    filter: str
    visit: str
    input_paths: list[str]
    single: bool = False


class DifferenceDone(Event):
    """subtract -> phot: a PSF-matched difference image (or a 'no reference' outcome)."""

    kind: Literal["diff.done"] = "diff.done"
    science_path: str
    object: str
    filter: str
    ok: bool = True
    reason: str = ""
    path: str = ""
    noise_path: str = ""
    mask_path: str = ""
    conv_path: str = ""
    reference_path: str = ""


class PhotometryDone(Event):
    """phot -> watcher: catalogue of a single frame, stack or difference image."""

    kind: Literal["phot.done"] = "phot.done"
    image_path: str
    image_kind: Literal["single", "stack", "difference"]
    ok: bool = True
    reason: str = ""
    catalogue_path: str = ""
    candidates_path: str = ""
    ncandidates: int = 0
    zp: float | None = None
    seeing: float | None = None
    depth: float | None = None


class StageFailed(Event):
    """any stage -> watcher: one item failed definitively (bad input, no solution...)."""

    kind: Literal["stage.failed"] = "stage.failed"
    stage: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    item_path: str = ""
    reason: str

    def paths(self) -> list[str]:
        """``item_path`` when it is a path (it may name a visit, e.g. ``T0001_r_20250116_010000``)."""
        return [self.item_path] if "/" in self.item_path else []

    def subject(self, prefix: str = "gppy") -> str:
        """``<prefix>.<lane>.stage.failed.<stage>``: the stage is in the subject, so NATS
        permissions let a stage report only its own failures."""
        return f"{prefix}.{self.lane}.{self.kind}.{self.stage}"


def check_subject(event: Event, subject: str) -> None:
    """Refuse a ``stage.failed`` whose subject names another stage than its body (a stage
    reporting on behalf of another); raises :class:`MessageError`."""
    if isinstance(event, StageFailed) and subject.rsplit(".", 1)[-1] != event.stage:
        raise MessageError(f"stage.failed of stage {event.stage!r} published on {subject!r}")


class DeepStackRequest(Event):
    """CLI/API -> stack: a deep stack of one target across nights (optionally a 7DT reference)."""

    kind: Literal["deepstack.request"] = "deepstack.request"
    object: str
    filter: str
    nights: list[str] | None = None
    select: Literal["seeing", "depth", "all"] = "all"
    as_reference: bool = False


class NightDone(Event):
    """watcher -> all: a night reached its final state."""

    kind: Literal["night.done"] = "night.done"
    night_dir: str
    status: Literal["done", "failed"]
    summary_path: str = ""


AnyEvent = Annotated[
    NightReady | NightPlan | FrameCalibrated | FrameSolved | StackDone | DifferenceDone
    | PhotometryDone | StageFailed | DeepStackRequest | NightDone,
    Field(discriminator="kind"),
]
_adapter: TypeAdapter = TypeAdapter(AnyEvent)
KINDS = ["night.ready", "night.plan", "frame.calibrated", "frame.solved", "stack.done", "diff.done",
         "phot.done", "stage.failed", "deepstack.request", "night.done"]


def parse(data: bytes, max_bytes: int = 256 * 1024) -> Event:
    """Decode and validate a message; raise :class:`MessageError` with a clear reason."""
    if len(data) > max_bytes:
        raise MessageError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MessageError(f"malformed JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise MessageError("message is not a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MessageError(f"unknown schema_version {version!r} (this service understands {SCHEMA_VERSION})")
    if raw.get("kind") not in KINDS:
        raise MessageError(f"unknown message kind {raw.get('kind')!r}")
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        raise MessageError(f"invalid {raw.get('kind')} message: {exc.errors()[0]['loc']}: "
                           f"{exc.errors()[0]['msg']}") from exc


def check_paths(event: Event, roots: list[Path]) -> None:
    """Refuse a message naming a path outside the data roots (``..`` and symlinks resolved)."""
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    for p in event.paths():
        if not p:
            continue
        if not os.path.isabs(p):
            raise MessageError(f"path {p!r} is not absolute")
        real = Path(os.path.realpath(p))
        if not any(real == r or r in real.parents for r in real_roots):
            raise MessageError(f"path {p!r} lies outside the configured data roots")
