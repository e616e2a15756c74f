"""The NATS JetStream bus: one stream for the pipeline, durable pull consumers per stage.

Subjects are ``<prefix>.<lane>.<kind>`` (``gppy.survey.frame.calibrated``); dead letters go
to ``<prefix>.dlq.<stage>``. Each stage has two durable consumers, ``<stage>-too`` and
``<stage>-survey``, shared by every replica of the stage, so replicas split the work and
ToO messages are always pulled first.
"""

from __future__ import annotations

import json
import logging

import nats
from nats.js import api
from nats.js.errors import NotFoundError

from gppy.config import Settings
from gppy.messages import Event

log = logging.getLogger(__name__)
LANES = ("too", "survey")
STREAM_MAX_AGE_S = 30 * 86400.0
DUPLICATE_WINDOW_S = 6 * 3600.0


async def connect(settings: Settings, name: str) -> nats.NATS:
    """Connect with reconnection for ever (a broker restart must not end a service)."""
    opts: dict = dict(servers=[settings.nats_url], name=name, max_reconnect_attempts=-1,
                      reconnect_time_wait=1.0, connect_timeout=5, allow_reconnect=True)
    password = settings.secret("nats_password")
    if settings.nats_user:
        opts.update(user=settings.nats_user, password=password or "")
    return await nats.connect(**opts)


async def ensure_stream(js, settings: Settings) -> None:
    """Create (or update) the pipeline stream."""
    cfg = api.StreamConfig(
        name=settings.stream,
        subjects=[f"{settings.subject_prefix}.>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=STREAM_MAX_AGE_S,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_msg_size=settings.max_message_bytes * 4,
    )
    try:
        have = (await js.stream_info(settings.stream)).config
    except NotFoundError:
        await js.add_stream(cfg)
        return
    if (sorted(have.subjects or []) == cfg.subjects and have.max_age == cfg.max_age
            and have.duplicate_window == cfg.duplicate_window and have.max_msg_size == cfg.max_msg_size):
        return  # nothing to change (a stage's NATS user may not change the stream: deploy/nats)
    try:
        await js.update_stream(cfg)
    except Exception as exc:  # not allowed for this user, or refused by the server
        log.warning("stream %s differs from this service's configuration and could not be updated: %s",
                    settings.stream, exc)


async def ensure_consumer(js, settings: Settings, stage: str, lane: str, kinds: list[str]):
    """Create the durable pull consumer ``<stage>-<lane>`` and bind to it."""
    durable = f"{stage}-{lane}"
    cfg = api.ConsumerConfig(
        durable_name=durable,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver + 1,  # the runtime dead-letters at max_deliver itself
        filter_subjects=[consumer_filter(settings.subject_prefix, lane, k) for k in kinds],
        deliver_policy=api.DeliverPolicy.ALL,
        max_ack_pending=1000,
    )
    try:
        info = await js.consumer_info(settings.stream, durable)
    except NotFoundError:
        await js.add_consumer(settings.stream, cfg)
    else:
        have = sorted(info.config.filter_subjects or [info.config.filter_subject or ""])
        if have != sorted(cfg.filter_subjects):  # subjects changed by an upgrade: update in place
            log.info("consumer %s: filter subjects %s -> %s", durable, have, cfg.filter_subjects)
            await js.add_consumer(settings.stream, cfg)
    return await js.pull_subscribe_bind(durable=durable, stream=settings.stream)


def consumer_filter(prefix: str, lane: str, kind: str) -> str:
    """The subject a consumer of ``kind`` on ``lane`` filters on (``stage.failed`` carries the
    reporting stage as a last token)."""
    return f"{prefix}.{lane}.{kind}.*" if kind == "stage.failed" else f"{prefix}.{lane}.{kind}"


async def publish(js, event: Event, prefix: str = "gppy") -> None:
    """Publish with a content-derived message id (a retried publish is not duplicated)."""
    await js.publish(event.subject(prefix), event.to_bytes(), headers={"Nats-Msg-Id": event.msg_id()})


async def dead_letter(js, prefix: str, stage: str, reason: str, subject: str, data: bytes,
                      delivered: int) -> None:
    """Publish a dead letter ``<prefix>.dlq.<stage>`` with the reason and the original data."""
    body = {"stage": stage, "reason": reason, "subject": subject, "delivered": delivered,
            "data": data[:65536].decode("utf-8", "replace")}
    await js.publish(f"{prefix}.dlq.{stage}", json.dumps(body).encode())


async def kv_bucket(js, bucket: str, history: int = 1, ttl_s: float | None = None):
    """A JetStream key-value bucket, created on first use.

    ``ttl_s`` expires entries (e.g. per-visit stacking state after a month); ``None`` keeps
    them (the watcher's ledger).
    """
    try:
        return await js.key_value(bucket)
    except (NotFoundError, Exception):  # BucketNotFoundError subclasses NotFoundError
        params = {"bucket": bucket, "history": history}
        if ttl_s:
            params["ttl"] = ttl_s
        return await js.create_key_value(**params)
