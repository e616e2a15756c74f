"""Service runtime: the one small base that every stage service uses.

A stage subclasses :class:`StageService`, names the event kinds it consumes, and implements
``handle(event) -> list[Event]``. The runtime connects to NATS, provisions the stream and the
stage's durable consumers, pulls one message per free slot (ToO lane first), validates it,
sends in-progress heartbeats while the handler runs, publishes the resulting events, and acks
only then. Failures are retried up to ``max_deliver`` times and then dead-lettered and
reported; a bad input (:class:`PermanentError`) is reported at once. A full data volume
(ENOSPC, or a write root below ``settings.min_free_mb``) is nobody's fault: the service takes
no new message and handles the current one again once space is back, without counting an
attempt (:meth:`StageService.on_disk_full` reports the episode). SIGTERM stops pulling and
lets in-flight work finish (or be released for redelivery). Every service also serves
``/healthz``, ``/readyz``, ``/metrics`` and ``/status`` over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import ClassVar

import uvicorn
from fastapi import FastAPI, Response
from nats.errors import TimeoutError as NatsTimeout
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gppy import __version__, bus
from gppy.config import PathConfig, Settings, load_settings
from gppy.fitsio import BadInputError
from gppy.logs import frame_var, night_var, setup_logging
from gppy.messages import Event, MessageError, StageFailed, check_paths, check_subject, parse

log = logging.getLogger(__name__)
#: The run (night-ready attempt) of the message being handled; stamped on every event published.
run_var: contextvars.ContextVar[int] = contextvars.ContextVar("run", default=0)


class PermanentError(Exception):
    """A failure that retrying cannot fix (bad input, no solution): reported, not retried."""


#: Errors that mean "the disk is full", wherever they occur in an exception chain.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(exc: BaseException | None) -> bool:
    """True when ``exc`` (or its cause/context) is an ``OSError`` ENOSPC/EDQUOT."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_mb(path: str | os.PathLike) -> float:
    """Free space (MB, for unprivileged users) of the file system holding ``path`` (or its
    nearest existing parent)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize / 1e6


#: Entries of the services bucket expire this long after a replica's last heartbeat (s).
SERVICES_TTL_S = 30.0


def services_bucket(settings: Settings) -> str:
    """The KV bucket where every running replica announces itself (``gppy-services``).

    Keys are ``<stage>.<replica id>``; values are JSON (:meth:`StageService.presence`). The
    bucket's entries expire after :data:`SERVICES_TTL_S`, so a replica that died disappears.
    """
    return f"{settings.stream.lower()}-services"


def replica_id() -> str:
    """``<hostname>-<pid>``, restricted to the characters a KV key may hold."""
    return re.sub(r"[^-_a-zA-Z0-9]", "-", f"{socket.gethostname()}-{os.getpid()}")


class StageService:
    """Base class of every stage service."""

    name: ClassVar[str] = "stage"
    consumes: ClassVar[list[str]] = []
    #: Seconds between two heartbeats in the services bucket (and queue-depth readings).
    presence_every_s: float = 5.0

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or load_settings()
        self.paths: PathConfig = self.settings.paths()
        self.nc = None
        self.js = None
        self._subs: dict[str, object] = {}
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self._ready = False
        self.started = time.time()
        self.registry = CollectorRegistry()
        self.m_messages = Counter("gppy_messages_total", "Messages handled", ["stage", "outcome"],
                                  registry=self.registry)
        self.m_duration = Histogram("gppy_handle_seconds", "Handler duration", ["stage"],
                                    registry=self.registry,
                                    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900))
        self.m_inflight = Gauge("gppy_inflight", "Messages being handled", ["stage"], registry=self.registry)
        self.m_step = Histogram("gppy_step_seconds", "Duration of named steps", ["stage", "step"],
                                registry=self.registry, buckets=(0.05, 0.2, 1, 5, 20, 60, 300))
        self.m_queue = Gauge("gppy_queue_pending", "Messages waiting in the stage's consumer", ["stage", "lane"],
                             registry=self.registry)
        self.m_ack_pending = Gauge("gppy_queue_ack_pending", "Messages delivered and not acknowledged yet",
                                   ["stage", "lane"], registry=self.registry)
        self.m_gpu = Gauge("gppy_gpu_memory_used_bytes", "GPU memory held by the CuPy pool (GPU services only)",
                           ["stage"], registry=self.registry)
        self.last_error: str = ""
        self.counts = {"ok": 0, "failed": 0, "retried": 0, "dead_lettered": 0, "held_for_space": 0}
        self._full_since: float | None = None
        self.replica = replica_id()

    # ---------------------------------------------------------------- for subclasses
    async def setup(self) -> None:
        """Called once after connecting (open KV buckets, warm caches...)."""

    async def handle(self, event: Event) -> list[Event]:
        raise NotImplementedError

    def extra_routes(self, app: FastAPI) -> None:
        """Add service-specific HTTP routes (the watcher's API)."""

    async def on_disk_full(self, root: str, free: float, full: bool, waited_s: float = 0.0) -> None:
        """Called once when a data root becomes full (``full``) and once when space is back.

        The default logs; the watcher also tells Slack.
        """
        if full:
            log.error("no space left: %s has %.0f MB free (< %.0f MB); not taking messages, holding the "
                      "current ones until space is freed", root, free, self.settings.min_free_mb)
        else:
            log.warning("space available again on %s (%.0f MB free) after %.0f s: resuming", root, free, waited_s)

    # ---------------------------------------------------------------- helpers
    async def publish(self, event: Event) -> None:
        """Publish ``event``, carrying the run of the message being handled."""
        run = run_var.get()
        # a night-ready starts a run of its own (its attempt): it never inherits the run of the
        # message being handled (the watcher retries a night from a failure's handler)
        if run and not event.run and event.kind != "night.ready":
            event = event.model_copy(update={"run": run})
        await bus.publish(self.js, event, self.settings.subject_prefix)

    def failed(self, event: Event, reason: str, item: str = "") -> StageFailed:
        """A :class:`StageFailed` event for ``event``'s night."""
        return StageFailed(night_id=event.night_id, unit=event.unit, lane=event.lane, stage=self.name,
                           item_path=item, reason=reason[:2000])

    @contextlib.contextmanager
    def step(self, name: str):
        """Time a named step into the ``gppy_step_seconds`` histogram."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.m_step.labels(self.name, name).observe(time.perf_counter() - t0)

    # ---------------------------------------------------------------- disk space
    def write_roots(self) -> list[Path]:
        """The data roots this service writes into (products, scratch, masters, logs)."""
        p = self.paths
        return [Path(r) for r in (p.path_processed, p.path_scratch, p.path_mframe, p.path_log) if r]

    def full_root(self) -> tuple[str, float] | None:
        """``(root, free MB)`` of a write root below ``settings.min_free_mb``, else None."""
        if self.settings.min_free_mb <= 0:
            return None
        for root in self.write_roots():
            with contextlib.suppress(OSError):
                free = free_mb(root)
                if free < self.settings.min_free_mb:
                    return str(root), free
        return None

    async def wait_for_space(self) -> bool:
        """Return at once when no data root is full; otherwise wait until space is back (or the
        service stops), reporting the episode once. True when it had to wait."""
        full = self.full_root()
        if full is None:
            return False
        if self._full_since is None:
            self._full_since = time.time()
            await self.on_disk_full(full[0], full[1], True)
        while full is not None and not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=2.0)
            full = self.full_root()
        if full is None and self._full_since is not None:
            waited, self._full_since = time.time() - self._full_since, None
            root = self.write_roots()[0]
            await self.on_disk_full(str(root), free_mb(root), False, waited)
        return True

    async def _handle_with_space(self, event: Event) -> list[Event]:
        """``handle(event)``; when the disk was full (ENOSPC, or a data root full at the end),
        its outcome is not trusted: wait for space and handle it again, without counting an
        attempt (a full disk is not the message's fault, and must not lose it)."""
        while True:
            try:
                outputs = await self.handle(event)
            except Exception as exc:
                if not (disk_full_error(exc) or self.full_root()):
                    raise
                log.warning("handling failed while the disk was full (%s: %s); will handle it again once "
                            "space is back", exc.__class__.__name__, str(exc)[:300])
            else:
                if self.full_root() is None:
                    return outputs
                log.warning("a data root filled up while handling; outcome discarded, will handle it again")
            self.counts["held_for_space"] += 1
            await self.wait_for_space()
            if self._stopping.is_set():
                raise asyncio.CancelledError

    # ---------------------------------------------------------------- lifecycle
    async def connect(self) -> None:
        self.nc = await bus.connect(self.settings, f"gppy-{self.name}")
        self.js = self.nc.jetstream()
        await bus.ensure_stream(self.js, self.settings)
        if self.consumes:
            for lane in bus.LANES:
                self._subs[lane] = await bus.ensure_consumer(self.js, self.settings, self.name, lane,
                                                             self.consumes)
        await self.setup()
        self._ready = True
        log.info("%s joined its consumers (%s)", self.name, ", ".join(self.consumes) or "none")

    async def _fetch_one(self):
        """One message, ToO lane first; None when both lanes are empty."""
        for lane, timeout in (("too", 0.05), ("survey", 1.0)):
            sub = self._subs.get(lane)
            if sub is None:
                continue
            msg = await self._fetch_from(sub, timeout)
            if msg is None and lane == "too" and await self._lane_pending(sub):
                # a short wait can time out on a loaded host although a ToO message waits:
                # the consumer's pending count says so, and then the ToO lane is waited for
                msg = await self._fetch_from(sub, 2.0)
            if msg is not None:
                return msg
        return None

    @staticmethod
    async def _fetch_from(sub, timeout: float):
        try:
            msgs = await sub.fetch(batch=1, timeout=timeout)
        except (TimeoutError, NatsTimeout):
            return None
        return msgs[0] if msgs else None

    @staticmethod
    async def _lane_pending(sub) -> bool:
        """Whether the lane's consumer still has messages to deliver (False if unknown)."""
        try:
            info = await sub.consumer_info()
        except Exception:  # noqa: BLE001 - an unknown count only costs the priority of this poll
            return False
        return bool(info.num_pending)

    async def run_consumers(self) -> None:
        sem = asyncio.Semaphore(max(1, self.settings.concurrency))
        while not self._stopping.is_set():
            await sem.acquire()
            if self._stopping.is_set():
                sem.release()
                break
            if await self.wait_for_space():  # a full disk: take nothing until it has room again
                sem.release()
                continue
            try:
                msg = await self._fetch_one()
            except Exception as exc:  # connection trouble: back off and retry
                sem.release()
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if msg is None:
                sem.release()
                continue
            task = asyncio.create_task(self._process(msg))
            self._inflight.add(task)
            task.add_done_callback(lambda t: (self._inflight.discard(t), sem.release()))

    async def _heartbeat(self, msg) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _process(self, msg) -> None:
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        try:
            event = parse(msg.data, self.settings.max_message_bytes)
            check_subject(event, msg.subject)
            check_paths(event, self.paths.roots())
        except MessageError as exc:
            log.error("refused message on %s: %s", msg.subject, exc)
            await bus.dead_letter(self.js, self.settings.subject_prefix, self.name, str(exc), msg.subject,
                                  msg.data, delivered)
            self.m_messages.labels(self.name, "refused").inc()
            self.counts["dead_lettered"] += 1
            await msg.term()
            return
        night_var.set(event.night_id)
        run_var.set(event.run or int(getattr(event, "attempt", 0) or 0))
        frame_var.set(getattr(event, "path", "") or getattr(event, "night_dir", ""))
        if delivered > self.settings.max_deliver:
            # Every earlier delivery ended without an outcome (a failure would have been counted
            # and dead-lettered at max_deliver): the workers died on it. This is the consumer's
            # last delivery; give up now, so the night is told instead of waiting for ever.
            reason = (f"delivered {delivered} times without an outcome: the worker handling it died each time "
                      f"(killed, out of memory?)")
            log.error("giving up: %s", reason)
            await self._give_up(msg, event, reason, delivered)
            return
        hb = asyncio.create_task(self._heartbeat(msg))
        self.m_inflight.labels(self.name).inc()
        t0 = time.perf_counter()
        try:
            outputs = await self._handle_with_space(event)
            for out in outputs or []:
                await self.publish(out)
            await msg.ack_sync()
            self.m_messages.labels(self.name, "ok").inc()
            self.counts["ok"] += 1
        except (PermanentError, BadInputError) as exc:
            reason = str(exc)
            log.error("permanent failure: %s", reason)
            await self._give_up(msg, event, reason, delivered)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception as exc:
            reason = f"{exc.__class__.__name__}: {exc}"
            self.last_error = reason
            if delivered >= self.settings.max_deliver:
                log.exception("failed %d times, dead-lettering: %s", delivered, reason)
                await self._give_up(msg, event, reason, delivered)
            else:
                log.warning("attempt %d failed, will retry: %s", delivered, reason)
                self.m_messages.labels(self.name, "retried").inc()
                self.counts["retried"] += 1
                with contextlib.suppress(Exception):
                    await msg.nak(delay=min(30.0, 2.0 ** delivered))
        finally:
            hb.cancel()
            self.m_inflight.labels(self.name).dec()
            self.m_duration.labels(self.name).observe(time.perf_counter() - t0)

    async def _give_up(self, msg, event: Event, reason: str, delivered: int) -> None:
        self.last_error = reason
        item = getattr(event, "path", "") or getattr(event, "night_dir", "")
        with contextlib.suppress(Exception):
            await self.publish(self.failed(event, reason, item))
        await bus.dead_letter(self.js, self.settings.subject_prefix, self.name, reason, msg.subject,
                              msg.data, delivered)
        await msg.term()
        self.m_messages.labels(self.name, "failed").inc()
        self.counts["failed"] += 1

    # ---------------------------------------------------------------- presence
    def presence(self) -> dict:
        """What this replica announces in the services bucket."""
        return {"stage": self.name, "replica": self.replica, "host": socket.gethostname(), "pid": os.getpid(),
                "version": __version__, "started": self.started, "last_seen": time.time(),
                "inflight": len(self._inflight), "concurrency": self.settings.concurrency,
                "counts": dict(self.counts), "ready": self._ready}

    async def _observe(self) -> None:
        """Queue depth of this stage's consumers and GPU memory, into the metrics."""
        for lane in bus.LANES if self.consumes else ():
            with contextlib.suppress(Exception):
                info = await self.js.consumer_info(self.settings.stream, f"{self.name}-{lane}")
                self.m_queue.labels(self.name, lane).set(info.num_pending)
                self.m_ack_pending.labels(self.name, lane).set(info.num_ack_pending)
        cupy = sys.modules.get("cupy")  # only where the service itself uses the GPU
        if cupy is not None:
            with contextlib.suppress(Exception):
                self.m_gpu.labels(self.name).set(cupy.get_default_memory_pool().used_bytes())

    async def _presence_loop(self) -> None:
        """Heartbeat ``<stage>.<replica>`` into the services bucket until stopping; then remove it."""
        kv = None
        key = f"{self.name}.{self.replica}"
        while not self._stopping.is_set():
            try:
                if kv is None:
                    kv = await bus.kv_bucket(self.js, services_bucket(self.settings), ttl_s=SERVICES_TTL_S)
                await kv.put(key, json.dumps(self.presence()).encode())
                await self._observe()
            except Exception as exc:  # the bus is down or the bucket unusable: try again later
                log.debug("presence heartbeat failed: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.presence_every_s)
        if kv is not None:
            with contextlib.suppress(Exception):
                await kv.delete(key)

    # ---------------------------------------------------------------- HTTP
    def app(self) -> FastAPI:
        app = FastAPI(title=f"gppy {self.name}", version=__version__)

        @app.get("/healthz")
        async def healthz():
            return {"ok": True, "stage": self.name}

        @app.get("/readyz")
        async def readyz(response: Response):
            ok = self._ready and self.nc is not None and self.nc.is_connected
            if not ok:
                response.status_code = 503
            return {"ready": ok}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")

        @app.get("/status")
        async def status():
            return {"stage": self.name, "version": __version__, "uptime_s": round(time.time() - self.started, 1),
                    "inflight": len(self._inflight), "counts": self.counts, "last_error": self.last_error,
                    "consumes": self.consumes, "connected": bool(self.nc and self.nc.is_connected)}

        self.extra_routes(app)
        return app

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT: consumers plus the HTTP endpoints."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._stopping.set)
        server = None
        http_task = None
        if self.settings.http_port:
            config = uvicorn.Config(self.app(), host=self.settings.http_host, port=self.settings.http_port,
                                    log_level="warning", lifespan="off")
            server = uvicorn.Server(config)
            server.install_signal_handlers = lambda: None  # we handle signals ourselves
            http_task = asyncio.create_task(server.serve())
        await self.connect()
        consumer_task = asyncio.create_task(self.run_consumers())
        presence_task = asyncio.create_task(self._presence_loop())
        await self._stopping.wait()
        log.info("stopping: no new messages; %d in flight", len(self._inflight))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(presence_task, timeout=5.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(consumer_task, timeout=3.0)
        if self._inflight:
            done, pending = await asyncio.wait(self._inflight, timeout=self.settings.ack_wait_s / 2)
            for task in pending:  # released for redelivery to another replica
                task.cancel()
        await self.background_stop()
        if server is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await http_task
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=5)
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def background_stop(self) -> None:
        """Hook for services with background tasks (the watcher's scanner)."""


def run_service(cls: type[StageService]) -> None:
    """Console-script entry point shared by every service."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"gppy-{cls.name}", description=f"gppy {cls.name} service")
    parser.add_argument("--config", help="path.json (default: $GPPY_CONFIG)")
    parser.add_argument("--port", type=int, help="HTTP port for /healthz, /metrics, ... (0: none)")
    parser.add_argument("--nats", help="NATS URL (default: $GPPY_NATS_URL)")
    args = parser.parse_args()
    settings = load_settings(config=args.config, http_port=args.port, nats_url=args.nats)
    log_root = None
    with contextlib.suppress(Exception):  # no path.json yet: container logs only
        log_root = settings.paths().path_log
    setup_logging(cls.name, settings.log_json, unit_log_root=log_root)
    asyncio.run(cls(settings).serve())
