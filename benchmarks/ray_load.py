"""Issue 37's load test: `sparsedit serve --ray --replicas 2` on a local Ray, C clients x R mixed previews and
commits at once on S shared sessions, the replica owning the most sessions killed halfway; then every session's
committed record replayed in one process (a Ray worker set up as the replicas are) and every reply compared.

    python benchmarks/ray_load.py --clients 8 --requests 20 --sessions 2

Prints one row: lost (acknowledged commits missing from the record), wrong (replies that differ from the replay),
failed requests, p50/p95/max latency of the answered ones.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--sessions", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--lease", type=float, default=5.0, help="lease_seconds: how long a killed replica's sessions wait")
    p.add_argument("--no-kill", action="store_true")
    args = p.parse_args(argv)

    import ray
    from profile_edit import cpu_name
    from ray import serve
    from ray.util import list_named_actors

    from sparsedit.serve import loadtest, ray_app

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpus = os.cpu_count() / args.replicas
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_app.build(replicas=args.replicas, cpus_per_replica=cpus, lease_seconds=args.lease),
              name="sparsedit", route_prefix="/", blocking=False)  # fmt: skip
    store = ray.get_actor(f"{ray_app.STORE_NAME}:sparsedit")
    killed = []

    def kill_busiest():
        owners = [ray.get(store.summary.remote(sid))["replica"] for sid in ray.get(store.sessions.remote())]
        victim = max(set(owners), key=owners.count)
        for actor in list_named_actors(all_namespaces=True):
            if actor["name"].endswith(victim):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
                killed.append((victim, time.monotonic()))

    load = open("/proc/loadavg").read().split()[:3]
    started = time.monotonic()
    ids, sent = loadtest.run(f"http://127.0.0.1:{port}", clients=args.clients, requests=args.requests,
                             sessions=args.sessions, during=None if args.no_kill else kill_busiest,
                             during_after=args.clients * args.requests // 2)  # fmt: skip
    wall = time.monotonic() - started
    print(json.dumps(loadtest.summary(sent)), flush=True)
    replay = ray.remote(num_cpus=0)(loadtest.replay)
    wrong, lost = [], 0
    for sid in ids:
        record = ray.get(store.record.remote(sid))
        mine = [s for s in sent if s.session == sid]
        problems = ray.get(replay.remote(record, mine, threads=ray_app.replica_threads(cpus)))
        wrong += problems
        kept = len(record["ops"]) - 1
        lost += sum(1 for s in mine if s.status == 200 and s.commit and s.reply["edit"] > kept)
    row = {**loadtest.summary(sent), "wall_s": round(wall, 1), "lost": lost, "wrong": len(wrong),
           "problems": wrong[:5], "killed": [k[0] for k in killed], "clients": args.clients,
           "requests_each": args.requests, "sessions": args.sessions, "replicas": args.replicas,
           "lease_s": args.lease, "cpu": cpu_name(), "loadavg_before": load}  # fmt: skip
    print(json.dumps(row, indent=1))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
