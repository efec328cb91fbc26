"""A bounded load test of a running `sparsedit serve` (local or `--ray`), and the check that goes with it: every reply
equals a single-process replay of the session's committed order.

    python -m sparsedit.serve.loadtest --url http://127.0.0.1:8000 --clients 8 --requests 20

Each client sends `requests` edits, previews and commits mixed, to one of `sessions` shared sessions, all at once.
`run` returns what was sent and answered, with latencies; `replay` rebuilds a session in this process from its
committed record (the Ray store's, `ray_app.VersionedStore.record`) and compares every reply with it: a commit's
image with the replay after that commit, a preview's with the same preview on the replay at the committed edit the
reply names.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass

import numpy as np


__all__ = ["Sent", "replay", "run", "summary"]

OPTIONS = {"steps": 10, "strength": 0.5, "seed": 0}  # 5 denoising steps: quick, and still an SDEdit


@dataclass
class Sent:
    session: str
    client: int
    commit: bool
    state: dict
    status: int
    reply: dict | None
    seconds: float
    error: str | None = None


def b64png(a: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def unpng(s: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(s))))


def scene_image(size: int = 64, seed: int = 1) -> np.ndarray:
    from ..data import scenes

    x = scenes.sample(1, size, seed=seed)["image"][0]
    return ((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()


def _stroke(image: np.ndarray, rng: np.random.Generator, side: int = 6) -> np.ndarray:
    out = image.copy()
    h, w = image.shape[:2]
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    out[y : y + side, x : x + side] = rng.integers(0, 256, 3, dtype=np.uint8)
    return out


def run(url: str, model: str = "scene-ddpm", clients: int = 8, requests: int = 20, sessions: int = 2,
        commit_share: float = 0.5, options: dict | None = None, size: int = 64, seed: int = 0,
        during=None, during_after: int | None = None, timeout: float = 300.0,
        headers: dict | None = None) -> tuple[list[str], list[Sent]]:  # fmt: skip
    """Create `sessions` sessions, then run `clients` threads of `requests` edits each on them at once.
    `during()`: called once from another thread after `during_after` replies (e.g. to kill a replica). Returns the
    session ids and every request's `Sent`."""
    import httpx

    image = scene_image(size)
    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as c:
        ids = []
        for _ in range(sessions):
            r = c.post("/sessions", json={"model": model, "image": b64png(image), **(options or OPTIONS)})
            r.raise_for_status()
            ids.append(r.json()["session"])
    sent: list[Sent] = []
    lock = threading.Lock()
    fired = threading.Event()

    def client(k: int):
        rng = np.random.default_rng([seed, k])
        with httpx.Client(base_url=url, timeout=timeout, headers=headers) as c:
            for i in range(requests):
                sid = ids[(k + i) % len(ids)]
                commit = bool(rng.random() < commit_share)
                state = {"image": _stroke(image, rng)}
                started = time.perf_counter()
                try:
                    r = c.post(f"/sessions/{sid}/edits", json={"image": b64png(state["image"]), "commit": commit})
                    status, reply, error = r.status_code, (r.json() if r.status_code == 200 else None), None
                    if status != 200:
                        error = r.text[:300]
                except httpx.HTTPError as e:
                    status, reply, error = 0, None, repr(e)
                with lock:
                    sent.append(Sent(sid, k, commit, state, status, reply, time.perf_counter() - started, error))
                    due = during is not None and not fired.is_set() and len(sent) >= (during_after or 0)
                    if due:
                        fired.set()
                if due:
                    threading.Thread(target=during, daemon=True).start()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids, sent


def replay(record: dict, sent: list[Sent], registry=None, threads: int | None = None) -> list[str]:
    """Rebuild the session of `record` (model, options, committed ops) in this process and compare every reply in
    `sent` (of that session, answered 200) with it. Returns the mismatches, described (empty: all equal).
    `threads`: torch's thread count for the replay, the replicas' (float results differ in their last bits between
    thread counts)."""
    import torch

    from .models import ModelRegistry, tensor_to_png
    from .sessions import SessionManager

    if threads is not None:
        torch.set_num_threads(threads)
    manager = SessionManager(registry or ModelRegistry(), workers=1, reproducible=True)
    ops = record["ops"]
    if any(op.get("undo") for op in ops):
        raise ValueError("replay compares edits and previews; this record has undos.")
    answered = [s for s in sent if s.status == 200]
    problems = []
    try:
        manager.create(record["model"], ops[0]["state"], record["options"], "replay")

        def check(s: Sent, image) -> None:
            want = unpng(base64.b64encode(tensor_to_png(image)).decode())
            if not np.array_equal(unpng(s.reply["image"]), want):
                problems.append(f"client {s.client}: {'commit' if s.commit else 'preview'} at edit "
                                f"{s.reply['edit']} differs from the replay")  # fmt: skip

        commits = {s.reply["edit"]: s for s in answered if s.commit}
        for k in range(len(ops)):
            if k:
                image = manager.edit("replay", ops[k]["state"], commit=True)[0]
                if k in commits:
                    check(commits[k], image)
            for s in answered:
                if not s.commit and s.reply["edit"] == k:
                    check(s, manager.edit("replay", s.state, commit=False)[0])
        kept = len(ops) - 1
        acknowledged = sorted(commits)
        if acknowledged != [k for k in acknowledged if 1 <= k <= kept] or len(acknowledged) != len(set(acknowledged)):
            problems.append(f"acknowledged commits {acknowledged} are not among the {kept} kept")
        lost = [s for s in answered if s.commit and s.reply["edit"] > kept]
        if lost:
            problems.append(f"{len(lost)} acknowledged commits are not in the record")
        changed = sum(1 for s in answered if s.commit)
        if changed != len(acknowledged):
            problems.append(f"{changed} commits answered but {len(acknowledged)} distinct edit numbers")
    finally:
        manager.close()
    return problems


def summary(sent: list[Sent]) -> dict:
    """Counts and latency percentiles (seconds) of the answered requests."""
    ok = sorted(s.seconds for s in sent if s.status == 200)
    pct = (lambda q: float(np.percentile(ok, q))) if ok else (lambda q: float("nan"))
    return {"requests": len(sent), "answered": len(ok), "failed": len(sent) - len(ok),
            "statuses": sorted({s.status for s in sent}), "p50": pct(50), "p95": pct(95), "max": max(ok, default=0.0),
            "commits": sum(1 for s in sent if s.commit and s.status == 200)}  # fmt: skip


def main(argv=None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="scene-ddpm")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--sessions", type=int, default=2)
    args = p.parse_args(argv)
    _, sent = run(args.url, args.model, args.clients, args.requests, args.sessions)
    print(json.dumps(summary(sent), indent=1))


if __name__ == "__main__":
    main()
