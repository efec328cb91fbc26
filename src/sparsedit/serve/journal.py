"""The durable record of a server's sessions (`sparsedit serve --state-dir`): what is needed to rebuild each one.

A session is rebuilt by capturing its first state and replaying its committed operations in order: each edit, and
each undo (an edit back to the state before the last commit); every one is a deterministic function of the state
before it and its input, so the replay gives the same bits as the session had (under `--reproducible` or a pinned
`--calibration`). So the journal keeps, per session, its model and options (`session.json`) and each committed
operation's input state (`ops/00000.npz` the capture's, `00001.npz`, ...: the image, labels and mask as arrays, the
prompt, and whether it was an undo). The session's history of states follows from them (an edit pushes its state,
an undo pops one). Every file is written to a temporary name, flushed to disk and renamed into place before the
request that made it is answered, so a crash leaves either the whole file or none of it; leftover temporary files
are removed at the next start. Each state file carries a checksum of its content: a damaged file is never replayed
(the session keeps the states before it, and the damaged ones are moved aside and named in the log).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


__all__ = ["Journal", "JournaledSession", "default_state_dir", "history"]

log = logging.getLogger("sparsedit.serve")
FORMAT = 1
_ARRAYS = ("image", "labels", "mask")


def default_state_dir() -> Path:
    """`$SPARSEDIT_STATE_DIR`, else `$XDG_DATA_HOME/sparsedit/sessions` (`~/.local/share/sparsedit/sessions`)."""
    if os.environ.get("SPARSEDIT_STATE_DIR"):
        return Path(os.environ["SPARSEDIT_STATE_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "sparsedit" / "sessions"


@dataclass
class JournaledSession:
    id: str
    model: str
    options: dict
    ops: list[dict]  # committed operations in order: {"state": ..., "undo": bool}, the capture's first
    damaged: int = 0  # operation files found damaged (moved aside, not replayed)

    @property
    def states(self) -> list[dict]:
        """The history the operations leave: each edit pushes its state, each undo pops one."""
        return history(self.ops)


def history(ops: list[dict]) -> list[dict]:
    states = []
    for op in ops:
        if op.get("undo"):
            states.pop()
        else:
            states.append(op["state"])
    return states


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _op_bytes(state: dict, undo: bool) -> bytes:
    arrays = {k: np.ascontiguousarray(state[k]) for k in _ARRAYS if state.get(k) is not None}
    meta = {"prompt": state.get("prompt"), "undo": bool(undo), "format": FORMAT}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(arrays):
        a = arrays[k]
        digest.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.tobytes())
    meta["sha256"] = digest.hexdigest()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buf.getvalue()


def _read_op(path: Path) -> dict:
    """An operation file `{"state", "undo"}`, checked against its checksum; `ValueError` when it is damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            arrays = {k: z[k] for k in _ARRAYS if k in z.files}
    except Exception as e:  # a truncated or garbled zip, a missing member
        raise ValueError(f"{path.name} cannot be read ({type(e).__name__}: {e})") from None
    check = {"prompt": meta.get("prompt"), "undo": meta.get("undo"), "format": meta.get("format")}
    digest = hashlib.sha256(json.dumps(check, sort_keys=True).encode())
    for k in sorted(arrays):
        a = arrays[k]
        digest.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        digest.update(a.tobytes())
    if digest.hexdigest() != meta.get("sha256"):
        raise ValueError(f"{path.name} does not match its checksum")
    state = dict(arrays)
    if meta.get("prompt") is not None:
        state["prompt"] = meta["prompt"]
    return {"state": state, "undo": bool(meta.get("undo"))}


class Journal:
    """Sessions' durable records under `root` (one directory per session)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, session_id: str) -> Path:
        if not session_id or "/" in session_id or session_id.startswith("."):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.root / session_id

    def begin(self, session_id: str, model: str, options: dict, ops: list[dict]) -> None:
        """Record a new session (its capture, or operations resumed from elsewhere) before it is announced."""
        d = self._dir(session_id)
        (d / "ops").mkdir(parents=True, exist_ok=True)
        for i, op in enumerate(ops):
            _atomic_write(d / "ops" / f"{i:05d}.npz", _op_bytes(op["state"], op.get("undo", False)))
        meta = {"id": session_id, "model": model, "options": options, "created": time.time(), "format": FORMAT}
        _atomic_write(d / "session.json", json.dumps(meta).encode())  # last: a session without it was never made

    def commit(self, session_id: str, index: int, state: dict, undo: bool = False) -> None:
        """Record committed operation number `index` (the capture's is 0) before it is answered."""
        _atomic_write(self._dir(session_id) / "ops" / f"{index:05d}.npz", _op_bytes(state, undo))

    def forget(self, session_id: str, index: int) -> None:
        """Remove operation `index` again (it was taken back before being answered)."""
        path = self._dir(session_id) / "ops" / f"{index:05d}.npz"
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def remove(self, session_id: str) -> None:
        shutil.rmtree(self._dir(session_id), ignore_errors=True)

    def parking(self, session_id: str) -> Path:
        """Where the session's editor is parked (written by `editor.save`; never replayed from after a restart)."""
        return self._dir(session_id) / "parked"

    def recover(self) -> list[JournaledSession]:
        """Every session recorded here, with its committed operations: temporary files and parked editors of the last
        run removed, directories of sessions whose creation never finished removed, damaged operations (and the ones
        after them, which depend on them) moved aside."""
        found = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for tmp in d.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            shutil.rmtree(d / "parked", ignore_errors=True)
            try:
                meta = json.loads((d / "session.json").read_text())
                if meta.get("id") != d.name or not isinstance(meta.get("model"), str):
                    raise ValueError("session.json does not describe this directory")
            except (OSError, ValueError) as e:
                log.warning("sparsedit serve: removing %s, a session whose creation never finished (%s)", d, e)
                shutil.rmtree(d, ignore_errors=True)
                continue
            files = sorted((d / "ops").glob("*.npz"))
            ops, damaged = [], 0
            for i, path in enumerate(files):
                try:
                    if path.name != f"{i:05d}.npz":
                        raise ValueError(f"{path.name} follows a missing operation")
                    op = _read_op(path)
                    if op["undo"] and len(history(ops)) < 2:  # the capture is no undo; an undo needs an edit
                        raise ValueError(f"{path.name} is not a valid operation here")
                    ops.append(op)
                except ValueError as e:
                    bad = files[i:]
                    aside = d / "damaged"
                    aside.mkdir(exist_ok=True)
                    for b in bad:
                        os.replace(b, aside / b.name)
                    damaged = len(bad)
                    log.warning("sparsedit serve: session %s: %s; its last %d operation(s) moved to %s and not "
                                "replayed", d.name, e, damaged, aside)  # fmt: skip
                    break
            if not ops:
                log.warning("sparsedit serve: session %s has no readable capture; removed", d.name)
                shutil.rmtree(d, ignore_errors=True)
                continue
            found.append(JournaledSession(d.name, meta["model"], dict(meta.get("options") or {}), ops, damaged))
        return found
