"""Durable sessions (issue 37): the journal of `sparsedit serve --state-dir`, recovery after a crash (a real SIGKILL of
a real server), the same next result after recovery, damaged and half-written files never used, and a commit that
cannot be written is not kept."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image


pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from sparsedit.serve import ModelRegistry  # noqa: E402
from sparsedit.serve.journal import Journal  # noqa: E402
from sparsedit.serve.sessions import JournalError, SessionManager  # noqa: E402


FAST = {"steps": 10, "strength": 0.5, "seed": 0}


def b64png(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def stroke(a, y, x, colour=(30, 60, 200), side=8):
    b = a.copy()
    b[y : y + side, x : x + side] = colour
    return b


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry()


@pytest.fixture(scope="module")
def image():
    from sparsedit.serve.app import scene_pngs

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(scene_pngs(1, 64)["image"])))).copy()


def test_the_journal_keeps_operations_and_recovers_only_whole_ones(tmp_path):
    j = Journal(tmp_path)
    a, b, c = (np.full((4, 4, 3), v, np.uint8) for v in (1, 2, 3))
    j.begin("s1", "scene-ddpm", {"steps": 10}, [{"state": {"image": a}, "undo": False}])
    j.commit("s1", 1, {"image": b})
    j.commit("s1", 2, {"image": c, "prompt": "a lake"})
    j.commit("s1", 3, {"image": b}, undo=True)
    (tmp_path / "s1" / "ops" / ".00004.npz.123.tmp").write_bytes(b"half")  # a write cut short
    (tmp_path / "s2" / "ops").mkdir(parents=True)  # a create that never finished: no session.json
    (tmp_path / "s2" / "ops" / "00000.npz").write_bytes(b"x")
    (found,) = j.recover()
    assert found.id == "s1" and found.model == "scene-ddpm" and found.options == {"steps": 10}
    assert [op["undo"] for op in found.ops] == [False, False, False, True]
    assert [int(s["image"][0, 0, 0]) for s in found.states] == [1, 2]  # the undo popped the third
    assert found.ops[2]["state"]["prompt"] == "a lake"
    assert not (tmp_path / "s2").exists() and not list((tmp_path / "s1").rglob("*.tmp"))
    # A damaged operation is never replayed: it and those after it (which depend on it) are moved aside, named.
    path = tmp_path / "s1" / "ops" / "00002.npz"
    data = bytearray(path.read_bytes())
    at = data.index(bytes([3] * 48))  # the image's pixels (all 3): one bit flipped
    data[at + 5] ^= 0x01
    path.write_bytes(bytes(data))
    (found,) = j.recover()
    assert len(found.ops) == 2 and found.damaged == 2
    assert sorted(p.name for p in (tmp_path / "s1" / "damaged").iterdir()) == ["00002.npz", "00003.npz"]


def test_a_restarted_manager_recovers_every_session_and_gives_the_same_next_result(registry, image, tmp_path):
    first = SessionManager(registry, state_dir=tmp_path, reproducible=True)
    session, _ = first.create("scene-ddpm", {"image": image}, FAST)
    sid = session.id
    first.edit(sid, {"image": stroke(image, 8, 8)})
    first.edit(sid, {"image": stroke(stroke(image, 8, 8), 40, 24)})
    first.undo(sid)
    first.edit(sid, {"image": stroke(stroke(image, 8, 8), 24, 40, (200, 30, 30))})
    nxt = {"image": stroke(stroke(stroke(image, 8, 8), 24, 40, (200, 30, 30)), 48, 48, (20, 200, 20))}
    want, _, _ = first.edit(sid, nxt, commit=False)
    edits = first.get(sid).edits
    del first  # a crash: nothing closed, nothing flushed beyond what each request wrote
    second = SessionManager(registry, state_dir=tmp_path, reproducible=True)
    assert second.recovered == 1 and second.get(sid).edits == edits == 2
    got, _, _ = second.edit(sid, nxt, commit=False)  # rebuilt by replaying the capture, edits and the undo
    assert np.array_equal(got.numpy(), want.numpy())
    second.close()  # a clean stop keeps journaled sessions for the next start
    third = SessionManager(registry, state_dir=tmp_path, reproducible=True)
    assert third.recovered == 1
    third.delete(sid)
    assert not (tmp_path / sid).exists()
    third.close()


def test_a_commit_that_cannot_be_written_is_not_kept(registry, image, tmp_path, monkeypatch):
    manager = SessionManager(registry, state_dir=tmp_path, reproducible=True)
    session, _ = manager.create("scene-ddpm", {"image": image}, FAST)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.journal, "commit", full)
    with pytest.raises(JournalError, match="not kept"):
        manager.edit(session.id, {"image": stroke(image, 8, 8)})
    assert session.edits == 0 and len(session.ops) == 1 and session.editor is None
    monkeypatch.undo()
    manager.edit(session.id, {"image": stroke(image, 8, 8)})  # rebuilt from the journal, then committed
    assert session.edits == 1 and len(list((tmp_path / session.id / "ops").glob("*.npz"))) == 2
    manager.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(state_dir, port):
    proc = subprocess.Popen([sys.executable, "-m", "sparsedit", "serve", "--port", str(port), "--state-dir",
                             str(state_dir), "--reproducible"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start: " + (proc.stdout.read() or ""))


def test_sigkill_mid_session_then_restart_loses_no_committed_edit(image, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path, port)
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            sid = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).json()["session"]
            one = stroke(image, 8, 8)
            assert c.post(f"/sessions/{sid}/edits", json={"image": b64png(one)}).json()["edit"] == 1
            two = stroke(one, 40, 24)
            assert c.post(f"/sessions/{sid}/edits", json={"image": b64png(two)}).json()["edit"] == 2
            three = stroke(two, 24, 48, (200, 30, 30))
            want = c.post(f"/sessions/{sid}/edits", json={"image": b64png(three), "commit": False}).json()["image"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    proc = _start(tmp_path, port)
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            info = c.get(f"/sessions/{sid}").json()
            assert info["edits"] == 2 and info["model"] == "scene-ddpm"
            got = c.post(f"/sessions/{sid}/edits", json={"image": b64png(three), "commit": False}).json()["image"]
            assert got == want  # the same PNG: the same bits
            assert c.delete(f"/sessions/{sid}").status_code == 204
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert json.loads(json.dumps(os.listdir(tmp_path))) == []
