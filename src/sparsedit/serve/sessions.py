"""Editing sessions of a server: one editor each, requests of a session serialized, sessions in parallel up to the
worker count, a memory budget with least-recently-used parking, and every committed state kept.

A session's history is the list of its committed input states (the capture's first). Nothing a person made is lost:
a parked session resumes from its saved editor (`editor.save`), or, where a session cannot be saved, is captured again
from its current state; `undo` edits back to the previous state.
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

from .models import ModelRegistry, SessionEditor


__all__ = ["OverCapacity", "Session", "SessionManager", "UnknownSession"]


class UnknownSession(KeyError):
    pass


class OverCapacity(RuntimeError):
    """No room for another session: every slot is taken by a session in use."""


@dataclass
class Session:
    id: str
    model: str
    options: dict
    states: list[dict]  # committed input states, the capture's first
    editor: SessionEditor | None = None
    parked: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    capture_seconds: float = 0.0
    # The capture's statistics, taken while the session was held: by the time its response is written, a parallel
    # request may have parked the session (its editor gone).
    capture_stats: dict = field(default_factory=dict)

    @property
    def edits(self) -> int:
        return len(self.states) - 1


class SessionManager:
    """Owns the sessions. `memory_budget` (bytes) bounds the caches of live sessions: when a request leaves them
    above it, idle sessions are parked, least recently used first. `max_sessions` bounds how many exist."""

    def __init__(self, registry: ModelRegistry, workers: int = 2, memory_budget: int | None = None,
                 max_sessions: int = 64, state_dir: str | Path | None = None, reproducible: bool = False):  # fmt: skip
        self.registry = registry
        self.reproducible = reproducible
        self.sessions: dict[str, Session] = {}
        self.workers = threading.BoundedSemaphore(max(1, workers))
        self.memory_budget = memory_budget
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="sparsedit-sessions-"))
        self.replica = f"{os.uname().nodename}:{os.getpid()}"

    # -- lifecycle ------------------------------------------------------------------------------------------------------
    def create(self, model_name: str, state: dict, options: dict, session_id: str | None = None,
               states: list | None = None) -> tuple[Session, object]:  # fmt: skip
        """A new session (`session_id`: a given id; `states`: a committed history to resume, its last state
        captured)."""
        model = self.registry.get(model_name)
        options = {**model.defaults, **{k: v for k, v in options.items() if v is not None}}
        with self._lock:
            if len(self.sessions) >= self.max_sessions:
                raise OverCapacity(
                    f"this server holds its maximum of {self.max_sessions} sessions; delete one (DELETE "
                    "/sessions/{id}) or try again later."
                )
            session = Session(session_id or uuid.uuid4().hex[:16], model_name, options, list(states or [state]))
            session.busy += 1
            self.sessions[session.id] = session
        try:
            with session.lock, self.workers:
                session.editor = SessionEditor(model, options, self.reproducible)
                started = time.perf_counter()  # the dense capture alone (the model's first load excluded)
                image = session.editor.capture(session.states[-1])
                session.capture_seconds = time.perf_counter() - started
                session.capture_stats = dict(session.editor.editor.last_stats)
        except BaseException:
            with self._lock:
                self.sessions.pop(session.id, None)
            if session.editor is not None:
                session.editor.close()
            raise
        finally:
            session.busy -= 1
        self._fit_budget(keep=session)
        return session, image

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

    def close(self) -> None:
        for sid in list(self.sessions):
            self.delete(sid)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- requests -----------------------------------------------------------------------------------------------------
    def run(self, session_id: str, fn):
        """Run `fn(session, editor)` with the session's lock and a worker slot, the session live."""
        session = self.get(session_id)
        with self._lock:
            session.busy += 1
        try:
            with session.lock, self.workers:
                editor = self._live(session)
                result = fn(session, editor)
                session.last_used = time.monotonic()
        finally:
            with self._lock:
                session.busy -= 1
        self._fit_budget(keep=session)
        return result

    def edit(self, session_id: str, state: dict, commit: bool = True):
        def do(session, editor):
            merged = {**session.states[-1], **{k: v for k, v in state.items() if v is not None}}
            image = editor.edit(merged, commit=commit)
            if commit and _differs(merged, session.states[-1]):
                session.states.append(merged)
            return image, editor.editor.last_stats, editor.editor.last_region

        return self.run(session_id, do)

    def undo(self, session_id: str):
        def do(session, editor):
            if len(session.states) < 2:
                raise ValueError("nothing to undo: this session has no committed edit.")
            previous = session.states[-2]
            image = editor.edit(previous, commit=True)
            session.states.pop()
            return image, editor.editor.last_stats, editor.editor.last_region

        return self.run(session_id, do)

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
                path = self.state_dir / victim.id
                shutil.rmtree(path, ignore_errors=True)
                if victim.editor.park(path):
                    victim.parked = path
                else:  # cannot be saved: drop the caches, keep the states (captured again on next use)
                    victim.editor.close()
                    victim.parked = None
                victim.editor = None

    def _live(self, session: Session) -> SessionEditor:
        """The session's editor, resumed from where it was parked, or captured again from its current state."""
        if session.editor is not None:
            return session.editor
        model = self.registry.get(session.model)
        if session.parked is not None:
            session.editor = SessionEditor.resume(model, session.options, session.parked, self.reproducible)
            shutil.rmtree(session.parked, ignore_errors=True)
            session.parked = None
        else:
            editor = SessionEditor(model, session.options, self.reproducible)
            editor.capture(session.states[-1])
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
