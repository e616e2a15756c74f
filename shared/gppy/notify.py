"""Slack notifications that never block or fail the pipeline (v1-behaviour.md §11.5).

v1 posted ``chat.postMessage`` synchronously and ignored the answer. Here a message is put on
an in-memory queue and sent by a background task (the HTTP call itself runs in a thread), so
a slow, unreachable or misconfigured Slack never delays processing. A failed send is retried
with exponential back-off (honouring ``Retry-After`` on HTTP 429) and, after the last try,
dropped with one log line. Errors that retrying cannot fix (a bad token, an unknown channel)
drop the message at once. Messages given the same ``key`` are collapsed: only the first is
sent, the repeats are counted (:meth:`SlackNotifier.collapsed`).

The token comes from ``settings.slack_token`` (``GPPY_SLACK_TOKEN``) or from the ``slack`` row
of v1's ``keys.dat`` (``settings.keys_file``); without one, messages are logged only.
``settings.slack_base_url`` points the client at another endpoint (a test server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from gppy.config import Settings
from gppy.tables import load_keys

log = logging.getLogger(__name__)

#: Slack error codes for which a retry cannot help.
PERMANENT_ERRORS = frozenset({
    "invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
    "no_permission", "missing_scope", "channel_not_found", "is_archived", "not_in_channel",
    "msg_too_long", "no_text", "invalid_arguments", "restricted_action",
})


def slack_token(settings: Settings) -> str | None:
    """The bot token: ``settings.slack_token`` or the ``slack`` row of ``keys.dat``."""
    token = settings.secret("slack_token")
    if token:
        return token.strip()
    try:
        keys = load_keys(settings.keys_file)
    except Exception as exc:  # an unreadable keys.dat must not stop a service
        log.warning("cannot read keys file %s: %s", settings.keys_file, exc)
        return None
    return keys.get("slack") or None


class SlackNotifier:
    """Queue of Slack messages sent by a background task.

    Parameters
    ----------
    token : str or None
        Bot token; ``None`` disables sending (messages are only logged).
    channel : str
        Channel for every message (``#pipeline`` in v1).
    base_url : str or None
        Slack Web API base URL; ``None`` for Slack itself.
    max_tries : int
        Attempts per message before it is dropped (the default rides out about 12 minutes
        without Slack).
    backoff_s, max_backoff_s : float
        First retry delay and its ceiling, in seconds (doubling each try).
    timeout_s : int
        HTTP timeout of one attempt, in seconds.
    queue_size : int
        Messages waiting beyond this are dropped (with a log line) instead of queued.
    """

    def __init__(self, token: str | None, channel: str = "#pipeline", base_url: str | None = None, *,
                 max_tries: int = 12, backoff_s: float = 2.0, max_backoff_s: float = 120.0,
                 timeout_s: int = 10, queue_size: int = 500):
        self.channel = channel
        self.enabled = bool(token)
        self.max_tries = max(1, max_tries)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._client = None
        if self.enabled:
            kwargs = {"token": token, "timeout": timeout_s, "retry_handlers": []}
            if base_url:
                kwargs["base_url"] = base_url
            self._client = WebClient(**kwargs)
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task | None = None
        self._keys: set[str] = set()
        self._repeats: Counter[str] = Counter()
        self.sent = 0
        self.dropped = 0

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs) -> SlackNotifier:
        token = slack_token(settings)
        if not token:
            log.info("no Slack token (GPPY_SLACK_TOKEN or keys.dat 'slack' row): notifications are logged only")
        return cls(token, settings.slack_channel, settings.slack_base_url, **kwargs)

    # ---------------------------------------------------------------- producer side
    def post(self, text: str, key: str | None = None) -> bool:
        """Queue ``text``; never blocks. Returns False when collapsed or dropped.

        With ``key``, only the first message of that key is sent; later ones are counted.
        """
        if key is not None:
            if key in self._keys:
                self._repeats[key] += 1
                return False
            self._keys.add(key)
        log.info("slack: %s", text)
        if not self.enabled:
            return False
        self._ensure_worker()
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("slack queue full (%d): dropped message: %s", self._queue.maxsize, text[:200])
            return False
        return True

    def collapsed(self, key: str) -> int:
        """How many repeats of ``key`` were not sent."""
        return self._repeats.get(key, 0)

    def forget(self, prefix: str) -> None:
        """Forget the keys starting with ``prefix`` (a night that ended)."""
        for k in [k for k in self._keys if k.startswith(prefix)]:
            self._keys.discard(k)
            self._repeats.pop(k, None)

    # ---------------------------------------------------------------- worker
    def _ensure_worker(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="slack-notifier")

    async def _worker(self) -> None:
        while True:
            text = await self._queue.get()
            try:
                await self._deliver(text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the worker die
                self.dropped += 1
                log.warning("slack message dropped (%s): %s", exc, text[:200])
            finally:
                self._queue.task_done()

    async def _deliver(self, text: str) -> None:
        delay = self.backoff_s
        last = ""
        for attempt in range(1, self.max_tries + 1):
            try:
                await asyncio.to_thread(self._client.chat_postMessage, channel=self.channel, text=text)
                self.sent += 1
                return
            except SlackApiError as exc:
                resp = exc.response
                error = (resp.get("error") if hasattr(resp, "get") else None) or f"HTTP {resp.status_code}"
                last = str(error)
                if error in PERMANENT_ERRORS:
                    self.dropped += 1
                    log.error("slack refused the message (%s); dropped, not retried: %s", error, text[:200])
                    return
                if resp.status_code == 429:
                    with contextlib.suppress(Exception):
                        delay = max(delay, float(resp.headers.get("Retry-After", delay)))
            except Exception as exc:  # connection refused, timeout, non-JSON answer...
                last = f"{exc.__class__.__name__}: {exc}"
            if attempt < self.max_tries:
                log.info("slack attempt %d/%d failed (%s); retrying in %.1f s", attempt, self.max_tries, last,
                         delay)
                await asyncio.sleep(delay)
                delay = min(self.max_backoff_s, delay * 2)
        self.dropped += 1
        log.warning("slack unreachable after %d tries (%s); dropped message: %s", self.max_tries, last,
                    text[:200])

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued message was sent or dropped; False on time-out."""
        if not self.enabled or self._task is None:
            return True
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 5.0) -> None:
        """Give queued messages ``timeout`` seconds, then drop the rest (logged) and stop."""
        if not await self.flush(timeout):
            left = self._queue.qsize()
            self.dropped += left
            log.warning("slack: %d queued message(s) dropped at shutdown", left)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
