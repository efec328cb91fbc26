"""Editing sessions of a server: one editor each, requests of a session serialized, sessions in parallel up to the
worker count, a memory budget with least-recently-used parking, and every committed state kept.

A session's history is the list of its committed input states (the capture's first). Nothing a person made is lost:
a parked session resumes from its saved editor (`editor.save`), or, where a session cannot be saved, is rebuilt by
capturing its first state and replaying its committed edits; `undo` edits back to the previous state. With a state
directory (`journal.Journal`), every session and committed state is on disk before the request that made it is
answered, and a restarted server recovers them all (rebuilt by the same replay on first use).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .journal import Journal, history
from .models import ModelRegistry, SessionEditor


__all__ = ["ClientLimit", "JournalError", "OverCapacity", "Session", "SessionManager", "UnknownSession"]


class UnknownSession(KeyError):
    pass


class OverCapacity(RuntimeError):
    """No room for another session: every slot is taken by a session in use."""


class ClientLimit(OverCapacity):
    """This client holds its maximum number of sessions."""


class JournalError(RuntimeError):
    """A committed change could not be written to the state directory (and was taken back)."""


@dataclass
class Session:
    id: str
    model: str
    options: dict
    states: list[dict]  # committed input states, the capture's first
    # Committed operations in order, what rebuilds the editor: {"state", "undo"}, the capture's first (`journal`).
    ops: list[dict] = field(default_factory=list)
    editor: SessionEditor | None = None
    parked: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    capture_seconds: float = 0.0
    # The capture's statistics, taken while the session was held: by the time its response is written, a parallel
    # request may have parked the session (its editor gone).
    capture_stats: dict = field(default_factory=dict)
    client: str | None = None  # who made it (the address), for the per-client limit; None: recovered

    @property
    def edits(self) -> int:
        return len(self.states) - 1


class SessionManager:
    """Owns the sessions. `memory_budget` (bytes) bounds the caches of live sessions: when a request leaves them
    above it, idle sessions are parked, least recently used first. `max_sessions` bounds how many exist.
    `session_limit` (bytes): a session whose caches the library predicts above it is refused before its capture
    runs (`CacheBudgetError`). `state_dir`: the durable journal of the sessions (recovered at start, kept at
    `close`); `None`: a temporary directory for parking only, removed at `close`. `idle_expiry` (seconds): sessions unused that long are deleted
    when another is created (`None`: never)."""

    def __init__(self, registry: ModelRegistry, workers: int = 2, memory_budget: int | None = None,
                 max_sessions: int = 64, state_dir: str | Path | None = None, reproducible: bool = False,
                 idle_expiry: float | None = None, max_per_client: int | None = None,
                 session_limit: int | None = None, max_request_seconds: float | None = None,
                 measure_dense: bool = False):  # fmt: skip
        self.registry = registry
        self.reproducible = reproducible
        # After the first capture of each model, input size and options: one plain pipeline (or generator) call on
        # the same input, timed, the page's honest reference for an edit's speed-up (a capture also fills caches).
        self.measure_dense = measure_dense
        self.sessions: dict[str, Session] = {}
        self.workers = threading.BoundedSemaphore(max(1, workers))
        self.memory_budget = memory_budget
        self.max_sessions = max_sessions
        self.idle_expiry = idle_expiry
        self.max_per_client = max_per_client
        self.session_limit = session_limit  # bytes one session's caches may need (the library refuses it first)
        self.max_request_seconds = max_request_seconds  # a capture predicted longer is refused before it runs
        self._lock = threading.Lock()
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="sparsedit-sessions-"))
        self.journal = None if self._own_dir else Journal(self.state_dir)
        self.replica = f"{os.uname().nodename}:{os.getpid()}"
        self.recovered = self._recover()

    def _recover(self) -> int:
        """The journal's sessions, not yet live (each is rebuilt by replay on its first request)."""
        if self.journal is None:
            return 0
        for js in self.journal.recover():
            try:
                self.registry.get(js.model)
            except KeyError:
                import logging

                logging.getLogger("sparsedit.serve").warning(
                    "sparsedit serve: session %s uses model %r, which this server does not offer; its files are "
                    "kept in %s", js.id, js.model, self.state_dir / js.id)  # fmt: skip
                continue
            self.sessions[js.id] = Session(js.id, js.model, js.options, js.states, js.ops)
        return len(self.sessions)

    def _parking(self, session_id: str) -> Path:
        return self.journal.parking(session_id) if self.journal is not None else self.state_dir / session_id

    # -- lifecycle ------------------------------------------------------------------------------------------------------
    def create(self, model_name: str, state: dict, options: dict, session_id: str | None = None,
               states: list | None = None, client: str | None = None, ops: list | None = None,
               progress=None) -> tuple[Session, object]:  # fmt: skip
        """A new session (`session_id`: a given id; `states`: a committed history to resume: its first state
        captured, the others replayed as edits; `ops`: committed operations to resume, undos included, replayed in
        order as `_live` does, the same bits as the session they come from; `progress(steps_done, steps)`: called
        after every denoising step of the capture)."""
        model = self.registry.get(model_name)
        options = {**model.defaults, **{k: v for k, v in options.items() if v is not None}}
        if self.max_request_seconds is not None and not ops and not states:
            self._check_time(model, state, options)
        self._expire()
        with self._lock:
            if len(self.sessions) >= self.max_sessions:
                raise OverCapacity(
                    f"this server holds its maximum of {self.max_sessions} sessions; delete one (DELETE "
                    "/sessions/{id}) or try again later."
                )
            if client is not None and self.max_per_client is not None:
                mine = sum(1 for s in self.sessions.values() if s.client == client)
                if mine >= self.max_per_client:
                    raise ClientLimit(
                        f"you hold this server's maximum of {self.max_per_client} sessions per client "
                        "(--max-sessions-per-client); delete one (DELETE /sessions/{id}) first."
                    )
            if ops:
                kept, ops = history(ops), list(ops)
            else:
                kept = list(states or [state])
                ops = [{"state": s, "undo": False} for s in kept]
            session = Session(session_id or uuid.uuid4().hex[:16], model_name, options, kept, ops)
            session.busy += 1
            session.client = client
            self.sessions[session.id] = session
        try:
            with session.lock, self.workers:
                session.editor = SessionEditor(model, options, self.reproducible, self.session_limit)
                started = time.perf_counter()  # the dense capture alone (the model's first load excluded)
                session.editor.watch(progress)
                try:
                    image = session.editor.capture(session.states[0])
                finally:
                    session.editor.watch(None)
                for op in session.ops[1:]:  # a resumed history: its edits replayed
                    image = session.editor.edit(op["state"], commit=True)
                session.capture_seconds = time.perf_counter() - started
                session.capture_stats = dict(session.editor.editor.last_stats)
                if self.measure_dense:
                    session.editor.measure_dense(session.states[0])
                if self.journal is not None:  # on disk before its id is announced
                    self.journal.begin(session.id, model_name, options, session.ops)
        except BaseException:
            with self._lock:
                self.sessions.pop(session.id, None)
            if session.editor is not None:
                session.editor.close()
            if self.journal is not None:
                self.journal.remove(session.id)
            raise
        finally:
            session.busy -= 1
        self._fit_budget(keep=session)
        return session, image

    def _check_time(self, model, state: dict, options: dict) -> None:
        """Refuse a capture predicted to take longer than `max_request_seconds` (`cost.CostModel`)."""
        from .cost import RequestTooSlow, steps_run

        key = "image" if "image" in state else "labels" if "labels" in state else None
        if key is None:
            return  # text to image at the model's own size: the reference itself
        h, w = state[key].shape[:2]
        steps = steps_run(model, options)
        seconds = model.cost().predict(h, w, steps)
        if seconds > self.max_request_seconds:
            raise RequestTooSlow(
                f"this capture ({w}x{h}, {steps} denoising steps on {model.name}) is predicted to take {seconds:.0f} "
                f"s on this server, over its limit of {self.max_request_seconds:.0f} s (--max-request-seconds); "
                "send a smaller image or fewer steps."
            )

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"no session {session_id!r}: it was deleted, or never made (POST /sessions).")
        return session

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self.sessions.pop(session_id, None)
        if session is None:
            raise UnknownSession(f"no session {session_id!r}.")
        with session.lock:
            if session.editor is not None:
                session.editor.close()
                session.editor = None
            if session.parked is not None:
                shutil.rmtree(session.parked, ignore_errors=True)
            if self.journal is not None:
                self.journal.remove(session_id)

    def _expire(self) -> None:
        """Delete the sessions unused for `idle_expiry` seconds (never one in use)."""
        if self.idle_expiry is None:
            return
        now = time.monotonic()
        with self._lock:
            stale = [s.id for s in self.sessions.values() if not s.busy and now - s.last_used > self.idle_expiry]
        for sid in stale:
            try:
                self.delete(sid)
            except UnknownSession:
                pass

    def close(self) -> None:
        """Release every session's editor. A journaled session stays on disk (the next server recovers it);
        without a state directory the sessions are deleted."""
        if self.journal is not None:
            for session in list(self.sessions.values()):
                with session.lock:
                    if session.editor is not None:
                        session.editor.close()
                        session.editor = None
                    session.parked = None  # parked editors are not reused across processes
            return
        for sid in list(self.sessions):
            self.delete(sid)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- requests -----------------------------------------------------------------------------------------------------
    def run(self, session_id: str, fn, progress=None):
        """Run `fn(session, editor)` with the session's lock and a worker slot, the session live; `progress(steps
        done, steps)` after each denoising step of `fn` (not of a rebuild)."""
        session = self.get(session_id)
        with self._lock:
            session.busy += 1
        try:
            with session.lock, self.workers:
                editor = self._live(session)
                editor.watch(progress)
                try:
                    result = fn(session, editor)
                finally:
                    editor.watch(None)
                session.last_used = time.monotonic()
        finally:
            with self._lock:
                session.busy -= 1
        self._fit_budget(keep=session)
        return result

    def edit(self, session_id: str, state: dict, commit: bool = True, progress=None):
        def do(session, editor):
            merged = {**session.states[-1], **{k: v for k, v in state.items() if v is not None}}
            image = editor.edit(merged, commit=commit)
            if commit and _differs(merged, session.states[-1]):
                session.states.append(merged)
                self._commit(session, {"state": merged, "undo": False}, revert=session.states.pop)
            return image, editor.editor.last_stats, editor.editor.last_region

        return self.run(session_id, do, progress)

    def undo(self, session_id: str, progress=None):
        def do(session, editor):
            if len(session.states) < 2:
                raise ValueError("nothing to undo: this session has no committed edit.")
            previous = session.states[-2]
            image = editor.edit(previous, commit=True)
            popped = session.states.pop()
            self._commit(session, {"state": previous, "undo": True}, revert=lambda: session.states.append(popped))
            return image, editor.editor.last_stats, editor.editor.last_region

        return self.run(session_id, do, progress)

    def _commit(self, session: Session, op: dict, revert) -> None:
        """Record a committed operation (and, with a journal, write it) before it is answered. If it cannot be
        written, it is taken back (`revert` restores the history) and the session's editor dropped, so its next
        request rebuilds it from what is recorded."""
        session.ops.append(op)
        if self.journal is None:
            return
        try:
            self.journal.commit(session.id, len(session.ops) - 1, op["state"], op["undo"])
        except OSError as e:
            session.ops.pop()
            revert()
            self.journal.forget(session.id, len(session.ops))
            if session.editor is not None:
                session.editor.close()
                session.editor = None
            raise JournalError(f"the edit could not be recorded in {self.state_dir} ({e}); it was not kept.") from e

    # -- memory: park least recently used ----------------------------------------------------------------------------------
    def live_bytes(self) -> int:
        return sum(s.editor.cache_bytes for s in list(self.sessions.values()) if s.editor is not None)

    def _fit_budget(self, keep: Session | None = None) -> None:
        if self.memory_budget is None:
            return
        while self.live_bytes() > self.memory_budget:
            with self._lock:
                idle = [s for s in self.sessions.values() if s.editor is not None and s.busy == 0 and s is not keep]
            if not idle:
                return
            victim = min(idle, key=lambda s: s.last_used)
            with victim.lock:
                if victim.editor is None or victim.busy:
                    continue
                path = self._parking(victim.id)
                shutil.rmtree(path, ignore_errors=True)
                if victim.editor.park(path):
                    victim.parked = path
                else:  # cannot be saved: drop the caches, keep the states (captured again on next use)
                    victim.editor.close()
                    victim.parked = None
                victim.editor = None

    def _live(self, session: Session) -> SessionEditor:
        """The session's editor, resumed from where it was parked, or rebuilt: its capture made again and its
        committed operations (edits, undos) replayed in order (the same bits as the session had, each being a
        deterministic function of the state before it)."""
        if session.editor is not None:
            return session.editor
        model = self.registry.get(session.model)
        if session.parked is not None:
            session.editor = SessionEditor.resume(model, session.options, session.parked, self.reproducible,
                                                  self.session_limit)  # fmt: skip
            shutil.rmtree(session.parked, ignore_errors=True)
            session.parked = None
        else:
            editor = SessionEditor(model, session.options, self.reproducible, self.session_limit)
            try:
                editor.capture(session.ops[0]["state"])
                for op in session.ops[1:]:
                    editor.edit(op["state"], commit=True)
            except BaseException:
                editor.close()
                raise
            session.editor = editor
        return session.editor


def _differs(a: dict, b: dict) -> bool:
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if x is None or y is None or x.shape != y.shape or not np.array_equal(x, y):
                return True
        elif x != y:
            return True
    return False
