"""`sparsedit serve --ray` (issue 20): on a local Ray with 2 CPU replicas, a session's edits all reach one replica,
sessions spread over both, and stopping a replica mid-session loses no committed edit."""

import socket
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
    serve.run(ray_app.build(replicas=2, cpus_per_replica=0.5), name="sparsedit", route_prefix="/", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sessions_stick_to_a_replica_spread_and_survive_losing_one(ray_server):
    from ray.util import list_named_actors

    from sparsedit.data import scenes

    image = ((scenes.sample(1, 64, seed=1)["image"][0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    with httpx.Client(base_url=ray_server, timeout=180) as c:
        assert c.get("/health").json()["status"] == "ok"
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
        for actor in list_named_actors(all_namespaces=True):
            if actor["name"].endswith(victim):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        time.sleep(1)
        r = c.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(stroke(image, 8, 10), 40, 40))})
        assert r.status_code == 200, r.text
        assert r.json()["edit"] == 3 and r.json()["stats"]["replica"] != victim  # nothing committed was lost
        assert c.get(f"/sessions/{sid}").json()["edits"] == 3
