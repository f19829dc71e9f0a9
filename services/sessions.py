"""Conversation sessions: multi-turn history as token grids, bounded, idle-evicted, one turn at a time.

A session keeps one `TURN_ROWS` grid ([rows, 2] int64, as the ensemble returns it) per finished turn; the next
request sends their concatenation as `HISTORY`. Limits:
- context: before a turn, the oldest turns are dropped until the history fits `max_context_tokens` rows; the
  lease reports how many were dropped so the response can say so;
- idle TTL: sessions unused for `ttl_seconds` are evicted (checked on every access and by a periodic sweep);
- count: past `max_sessions` the least recently used idle session is evicted;
- concurrency: a session runs one turn at a time; a second concurrent turn raises `SessionBusyError`
  (the server maps it to FAILED_PRECONDITION).
A failed or cancelled turn leaves the history unchanged. The store is used from one asyncio loop; the lock
only guards against helper threads.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

EMPTY_HISTORY = np.zeros((0, 2), dtype=np.int64)


class SessionNotFoundError(KeyError):
    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"unknown session {self.session_id!r} (never created, deleted, or evicted after its idle TTL)"


class SessionBusyError(RuntimeError):
    """Another turn of this session is running."""


class SessionLimitError(RuntimeError):
    """max_sessions reached and every session is busy."""


class NoReplyError(RuntimeError):
    """TruncateReply on a session whose last turn is not a spoken answer (or that has no turn)."""


SPEECH_TOKENS_PER_SECOND = 12.5  # the model's speech token rate (1920 output samples at 24 kHz per token)


@dataclass
class Reply:
    """Where the generated rows of the last turn sit, so a barge-in can cut them (TruncateReply)."""

    rows: np.ndarray  # the turn as committed (identity-checked against session.turns[-1])
    start: int  # index in `rows` of the first generated row
    speech: int  # speech tokens: the answer's first `speech` generated rows are audio rows
    eosp_row: np.ndarray | None  # the row with which the model ended its speech, if it did

    @classmethod
    def of(cls, rows: np.ndarray, start: int, generated: np.ndarray, output: str) -> Reply:
        """A spoken answer starts with audio-mode rows, all with the modality pad in the text channel; when the
        model ends its speech, the last of them carries EOSP and text rows follow."""
        g = generated
        if output != "speech" or len(g) == 0:
            return cls(rows, start, 0, None)
        other = np.nonzero(g[:, 0] != g[0, 0])[0]
        if len(other) == 0:  # stopped while speaking (max_new_tokens, context): no EOSP
            return cls(rows, start, len(g), None)
        run = int(other[0])
        return cls(rows, start, run - 1, g[run - 1].copy())


def truncate_reply(reply: Reply, keep: int) -> tuple[Reply | None, int]:
    """(The turn with its spoken answer cut to `keep` speech tokens, or None when nothing would change; the speech
    tokens the answer keeps).

    A spoken answer's generated rows start with audio-mode rows (all with the modality pad in the text channel,
    the last one carrying EOSP when the model ended its speech). The cut keeps the first `keep` of them, the EOSP
    row when the model wrote one, then `<|im_end|>` and the newline as text rows: the same closing the service
    commits for an answer that stopped early. Token ids are read from the rows themselves (no tokenizer here).
    """
    rows = reply.rows
    if reply.speech == 0:
        raise NoReplyError("the last turn has no spoken answer to truncate")
    if keep >= reply.speech:
        return None, reply.speech
    audio_pad = rows[-1, 1]  # the closing newline is a text row
    tail = np.array([[rows[-2, 0], audio_pad], rows[-1]], dtype=np.int64)  # <|im_end|>, newline
    eosp = [reply.eosp_row[None]] if reply.eosp_row is not None else []
    cut = np.concatenate([rows[: reply.start + keep], *eosp, tail]).astype(np.int64)
    return Reply(rows=cut, start=reply.start, speech=keep, eosp_row=reply.eosp_row), keep


def fit_history(s: Session, max_tokens: int, budget: int | None = None) -> int:
    """Drop the oldest turns until the history fits `max_tokens` (and `budget`, when given); returns how many went.
    One code path for every session store."""
    limit = max_tokens if budget is None else min(budget, max_tokens)
    dropped = 0
    while s.turns and s.history_tokens > limit:
        s.turns.popleft()
        dropped += 1
    s.dropped_turns += dropped
    return dropped


def truncate_last_reply(s: Session, audio_end_ms: int) -> tuple[int, int]:
    """Cut the session's last spoken answer to the speech tokens started before `audio_end_ms` (one code path for
    every session store). Returns (speech tokens kept, rows removed); raises NoReplyError."""
    keep = math.ceil(max(0, audio_end_ms) * SPEECH_TOKENS_PER_SECOND / 1000)
    reply = s.last_reply
    if reply is None or not s.turns or s.turns[-1] is not reply.rows:
        raise NoReplyError("the session's last turn has no spoken answer to truncate")
    cut, kept = truncate_reply(reply, keep)
    if cut is None:
        return kept, 0
    s.turns[-1] = cut.rows
    s.last_reply = cut  # a later, shorter cut still works
    return kept, len(reply.rows) - len(cut.rows)


@dataclass
class Session:
    session_id: str
    system_prompt: str = ""
    owner: str = ""  # the creator's API key id: other keys get NOT_FOUND (checked by the server)
    turns: deque[np.ndarray] = field(default_factory=deque)
    created_unix: float = field(default_factory=time.time)
    last_used: float = 0.0  # monotonic clock
    last_used_unix: float = field(default_factory=time.time)
    dropped_turns: int = 0
    busy: bool = False
    last_reply: Reply | None = None  # the generated rows of turns[-1], for TruncateReply

    @property
    def history_tokens(self) -> int:
        return sum(len(t) for t in self.turns)

    def history(self) -> np.ndarray:
        return np.concatenate(list(self.turns)) if self.turns else EMPTY_HISTORY


@dataclass
class TurnLease:
    """A session held by one RPC (a Converse turn, or a whole StreamConverse with several turns).

    Per turn: `prepare()` fits the history to the context budget and returns it with the number of turns just
    dropped; `commit(turn_rows)` appends the ensemble's TURN_ROWS once the turn finished.
    """

    session: Session
    store: SessionStore

    def prepare(self, budget: int | None = None) -> tuple[np.ndarray, int]:
        """`budget`: this turn's history rows (the server derives it from the served context), at most the
        store's max_context_tokens."""
        with self.store._lock:
            dropped = self.store._fit(self.session, budget)
            self.store._touch(self.session)
            return self.session.history(), dropped

    def commit(self, turn_rows: np.ndarray, generated: np.ndarray | None = None, output: str = "speech") -> None:
        rows = np.asarray(turn_rows, dtype=np.int64).reshape(-1, 2)
        with self.store._lock:
            self.session.turns.append(rows)
            self.session.last_reply = _locate_reply(rows, generated, output)
            self.store._touch(self.session)


def _locate_reply(rows: np.ndarray, generated: np.ndarray | None, output: str) -> Reply | None:
    """The generated rows sit before the closing (`\\n`, or `<|im_end|>\\n` when generation stopped early)."""
    if generated is None or len(generated) == 0:
        return None
    g = np.asarray(generated, dtype=np.int64).reshape(-1, 2)
    for closing in (1, 2):
        start = len(rows) - closing - len(g)
        if start >= 0 and np.array_equal(rows[start : start + len(g)], g):
            return Reply.of(rows, start, g, output)
    return None


class SessionStore:
    def __init__(
        self,
        ttl_seconds: float,
        max_sessions: int,
        max_context_tokens: int,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self.max_context_tokens = max_context_tokens
        self._clock = clock
        self._on_change = on_change or (lambda n: None)
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def _touch(self, s: Session) -> None:
        s.last_used = self._clock()
        s.last_used_unix = time.time()
        if s.session_id in self._sessions:  # deleted while a turn held it: the turn ends without it
            self._sessions.move_to_end(s.session_id)

    def _expired(self, s: Session, now: float) -> bool:
        return not s.busy and now - s.last_used > self.ttl_seconds

    def evict_expired(self) -> int:
        with self._lock:
            now = self._clock()
            gone = [sid for sid, s in self._sessions.items() if self._expired(s, now)]
            for sid in gone:
                del self._sessions[sid]
            n = len(self._sessions)
        if gone:
            self._on_change(n)
        return len(gone)

    def create(self, system_prompt: str = "", owner: str = "", max_per_owner: int = 0) -> Session:
        """A new session of `owner`. Past `max_per_owner` sessions of that owner (0 = no cap) raises
        SessionLimitError; a full store evicts only the owner's own least recently used idle session, never
        another owner's (unless its idle TTL has run out)."""
        self.evict_expired()
        with self._lock:
            if max_per_owner and sum(1 for x in self._sessions.values() if x.owner == owner) >= max_per_owner:
                raise SessionLimitError(
                    f"this API key holds {max_per_owner} sessions (max_sessions_per_key); delete one first"
                )
            if len(self._sessions) >= self.max_sessions:
                idle = next((sid for sid, x in self._sessions.items() if not x.busy and x.owner == owner), None)
                if idle is None:
                    raise SessionLimitError(
                        f"max_sessions={self.max_sessions} reached and none of this key's sessions is idle"
                    )
                del self._sessions[idle]
            s = Session(session_id=secrets.token_hex(16), system_prompt=system_prompt, owner=owner)
            self._sessions[s.session_id] = s
            self._touch(s)
            n = len(self._sessions)
        self._on_change(n)
        return s

    def get(self, session_id: str) -> Session:
        self.evict_expired()
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise SessionNotFoundError(session_id)
            return s

    def delete(self, session_id: str) -> None:
        """Raises SessionNotFoundError, or SessionBusyError while a turn runs (delete it after the turn)."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise SessionNotFoundError(session_id)
            if s.busy:
                raise SessionBusyError("the session is running a turn; delete it after the turn ends")
            del self._sessions[session_id]
            n = len(self._sessions)
        self._on_change(n)

    def _fit(self, s: Session, budget: int | None = None) -> int:
        return fit_history(s, self.max_context_tokens, budget)

    def truncate_reply(self, session_id: str, audio_end_ms: int) -> tuple[int, int, int]:
        """Cut the last spoken answer to the speech tokens started before `audio_end_ms` (a token partly heard is
        kept). Returns (speech tokens kept, rows removed, history rows). Raises SessionNotFoundError,
        SessionBusyError (a turn is running) or NoReplyError."""
        s = self.get(session_id)
        with self._lock:
            if s.busy:
                raise SessionBusyError(f"session {session_id!r} is running a turn; truncate after it finished")
            kept, removed = truncate_last_reply(s, audio_end_ms)
            if removed:
                self._touch(s)
            return kept, removed, s.history_tokens

    @contextmanager
    def hold(self, session_id: str) -> Iterator[TurnLease]:
        """Hold the session for one RPC (raises SessionNotFoundError / SessionBusyError)."""
        s = self.get(session_id)
        with self._lock:
            if s.busy:
                raise SessionBusyError(
                    f"session {session_id!r} is in use by another request or stream; a session serves one at a time"
                )
            s.busy = True
            self._touch(s)
        try:
            yield TurnLease(session=s, store=self)
        finally:
            with self._lock:
                s.busy = False
                self._touch(s)
