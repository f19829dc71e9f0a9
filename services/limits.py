"""Per-key and global limits: concurrent calls, turns per minute, input audio seconds per minute.

Every limit refusal is a `LimitError` carrying `retry_after` seconds (the server turns it into RESOURCE_EXHAUSTED
with `retry-after-ms` trailing metadata and a `google.rpc.RetryInfo` detail). State is per key id; key ids come
from the key file (or the one ANONYMOUS id with auth off), so the tables stay as small as the key set.
Used from one asyncio loop.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

WINDOW_SECONDS = 60.0


class LimitError(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, retry_after)


@dataclass
class _Window:
    """Amounts used over the last WINDOW_SECONDS."""

    events: deque[tuple[float, float]] = field(default_factory=deque)
    total: float = 0.0

    def prune(self, now: float) -> None:
        while self.events and now - self.events[0][0] >= WINDOW_SECONDS:
            self.total -= self.events.popleft()[1]

    def retry_after(self, now: float, need: float, limit: float) -> float:
        """Seconds until `need` more fits under `limit`."""
        total = self.total
        for t, amount in self.events:
            total -= amount
            if total + need <= limit:
                return t + WINDOW_SECONDS - now
        return WINDOW_SECONDS


@dataclass
class Limits:
    max_streams: int
    max_streams_per_key: int
    turns_per_minute: int
    audio_seconds_per_minute: float


class Limiter:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.streams = 0
        self._streams: dict[str, int] = defaultdict(int)
        self._turns: dict[str, _Window] = defaultdict(_Window)
        self._audio: dict[str, _Window] = defaultdict(_Window)

    @contextmanager
    def stream(self, key_id: str) -> Iterator[None]:
        """Hold one concurrent call of `key_id` (raises LimitError past the global or the key's cap)."""
        if self.streams >= self.limits.max_streams:
            raise LimitError(f"the server is at its limit of {self.limits.max_streams} concurrent calls", 1.0)
        if self._streams[key_id] >= self.limits.max_streams_per_key:
            raise LimitError(
                f"this API key has {self.limits.max_streams_per_key} concurrent calls open (max_streams_per_key)", 1.0
            )
        self.streams += 1
        self._streams[key_id] += 1
        try:
            yield
        finally:
            self.streams -= 1
            self._streams[key_id] -= 1

    def turn(self, key_id: str, audio_seconds: float = 0.0) -> None:
        """Account one turn (and its input audio) of `key_id`; raises LimitError when over a per-minute limit."""
        now = self._clock()
        turns, audio = self._turns[key_id], self._audio[key_id]
        turns.prune(now)
        audio.prune(now)
        lim = self.limits
        if turns.total + 1 > lim.turns_per_minute:
            raise LimitError(
                f"this API key started {lim.turns_per_minute} turns in the last minute (turns_per_minute_per_key)",
                turns.retry_after(now, 1, lim.turns_per_minute),
            )
        if audio_seconds and audio.total + audio_seconds > lim.audio_seconds_per_minute:
            if audio_seconds > lim.audio_seconds_per_minute:
                raise LimitError(
                    f"this turn has {audio_seconds:.1f} s of audio, more than the per-minute "
                    f"limit of {lim.audio_seconds_per_minute:g} s",
                    WINDOW_SECONDS,
                )
            raise LimitError(
                f"this API key sent {audio.total:.1f} s of audio in the last minute, limit "
                f"{lim.audio_seconds_per_minute:g} s (audio_seconds_per_minute_per_key)",
                audio.retry_after(now, audio_seconds, lim.audio_seconds_per_minute),
            )
        turns.events.append((now, 1.0))
        turns.total += 1
        if audio_seconds:
            audio.events.append((now, audio_seconds))
            audio.total += audio_seconds

    def remaining(self, key_id: str) -> dict[str, tuple[float, float, float]]:
        """The per-minute limits of `key_id` as {name: (limit, remaining, seconds until the oldest use leaves the
        window)}, for clients that pace themselves (sent as `x-ratelimit-*` trailing metadata)."""
        now = self._clock()
        out = {}
        for name, window, limit in (
            ("turns", self._turns.get(key_id), self.limits.turns_per_minute),
            ("audio-seconds", self._audio.get(key_id), self.limits.audio_seconds_per_minute),
        ):
            used, reset = 0.0, 0.0
            if window is not None:
                window.prune(now)
                used = window.total
                reset = window.events[0][0] + WINDOW_SECONDS - now if window.events else 0.0
            out[name] = (float(limit), max(0.0, limit - used), max(0.0, reset))
        return out


def rate_limit_metadata(remaining: dict[str, tuple[float, float, float]]) -> tuple[tuple[str, str], ...]:
    """`x-ratelimit-{limit,remaining,reset}-<name>` metadata (reset in seconds) from `Limiter.remaining`."""
    md = []
    for name, (limit, left, reset) in remaining.items():
        md += [
            (f"x-ratelimit-limit-{name}", f"{limit:g}"),
            (f"x-ratelimit-remaining-{name}", f"{left:g}"),
            (f"x-ratelimit-reset-{name}", f"{reset:.3f}"),
        ]
    return tuple(md)


def parse_rate_limit_metadata(metadata) -> dict[str, dict[str, float]]:
    """The inverse of `rate_limit_metadata` for clients: {name: {"limit", "remaining", "reset"}}; bad values are
    skipped."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metadata or ():
        if not key.startswith("x-ratelimit-") or isinstance(value, bytes):
            continue
        field_, _, name = key.removeprefix("x-ratelimit-").partition("-")
        if field_ in ("limit", "remaining", "reset") and name:
            try:
                out.setdefault(name, {})[field_] = float(value)
            except ValueError:
                continue
    return out
