"""`sparsedit serve --ray` (issues 20, 37): on a local Ray with 2 CPU replicas, a session's edits all reach one
replica, sessions spread over both, and stopping a replica mid-session loses no committed edit; concurrent previews
and commits from many clients, with a replica killed in the middle, are answered as a single-process replay of the
committed order (one owner per session: `ray_app.VersionedStore`)."""

import socket
import threading
import time

import pytest

from .test_serve import FAST, b64png, stroke


ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def ray_server():
    from ray import serve

    from sparsedit.serve import ray_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_app.build(replicas=2, cpus_per_replica=0.5, lease_seconds=3), name="sparsedit", route_prefix="/",
              blocking=False)  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def kill_replica(name):
    from ray.util import list_named_actors

    for actor in list_named_actors(all_namespaces=True):
        if actor["name"].endswith(name):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no replica {name}")


def test_sessions_stick_to_a_replica_spread_and_survive_losing_one(ray_server):
    from sparsedit.data import scenes

    image = ((scenes.sample(1, 64, seed=1)["image"][0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    with httpx.Client(base_url=ray_server, timeout=180) as c:
        assert c.get("/health").json()["status"] == "ok"
        # A capture's steps, polled at the ingress while a replica runs it (reported through the store).
        seen, made = [], {}
        creating = threading.Thread(
            target=lambda: made.update(
                c.post(
                    "/sessions",
                    json={"model": "scene-ddpm", "image": b64png(image), **FAST, "steps": 40, "progress": "ray-cap"},
                ).json()
            )
        )
        creating.start()
        while creating.is_alive():
            r = c.get("/progress/ray-cap")
            if r.status_code == 200:
                seen.append(r.json())
            time.sleep(0.05)
        assert "session" in made and seen and all(p["phase"] == "capture" and p["steps"] == 20 for p in seen), seen
        replicas = {}
        for _ in range(6):
            r = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST})
            assert r.status_code == 201, r.text
            replicas[r.json()["session"]] = [r.json()["stats"]["replica"]]
        for sid, seen in replicas.items():
            for j in range(2):
                r = c.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(image, 8 + 16 * j, 10))})
                assert r.status_code == 200 and r.json()["edit"] == j + 1, r.text
                seen.append(r.json()["stats"]["replica"])
        assert all(len(set(seen)) == 1 for seen in replicas.values())  # a session's requests: one replica
        assert len({seen[0] for seen in replicas.values()}) == 2  # six sessions: both replicas hold some
        # Stop the replica of the first session mid-session.
        sid, (victim, *_) = next(iter(replicas.items()))
        kill_replica(victim)
        time.sleep(1)
        r = c.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(stroke(image, 8, 10), 40, 40))})
        assert r.status_code == 200, r.text
        assert r.json()["edit"] == 3 and r.json()["stats"]["replica"] != victim  # nothing committed was lost
        assert c.get(f"/sessions/{sid}").json()["edits"] == 3


def test_concurrent_clients_and_a_killed_replica_lose_nothing_and_match_the_replay(ray_server):
    from sparsedit.serve import loadtest, ray_app

    store = ray.get_actor(f"{ray_app.STORE_NAME}:sparsedit")

    def kill_the_busiest():
        owners = [ray.get(store.summary.remote(sid))["replica"] for sid in ray.get(store.sessions.remote())]
        kill_replica(max(set(owners), key=owners.count))

    started = time.monotonic()
    ids, sent = loadtest.run(ray_server, clients=3, requests=4, sessions=1, during=kill_the_busiest, during_after=5,
                             timeout=120)  # fmt: skip
    print(loadtest.summary(sent), f"{time.monotonic() - started:.1f} s")
    assert all(s.status == 200 for s in sent), [(s.status, s.error) for s in sent if s.status != 200]
    assert len(sent) == 12
    record = ray.get(store.record.remote(ids[0]))
    # The replay runs in a Ray worker set up as the replicas are (the same thread count: the same bits).
    replay = ray.remote(num_cpus=0)(loadtest.replay)
    assert ray.get(replay.remote(record, sent, threads=ray_app.replica_threads(0.5))) == []
    assert len(record["ops"]) - 1 == sum(s.commit for s in sent)  # every commit kept once
