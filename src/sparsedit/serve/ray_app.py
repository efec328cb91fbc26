"""`sparsedit serve --ray --replicas N`: the same app as a Ray Serve application, sessions spread over replicas, one
owner per session.

A session's caches live on one replica. Ray Serve's model multiplexing (the session id as the multiplexed model id)
sends a session's requests to the replica that holds it, but only as a preference: under load it sends them
elsewhere. So the routing is not what keeps a session whole; the `SessionStore` actor is:

- It holds every session's committed record (model, options, committed operations: the capture's state, each edit,
  each undo) and its **version** (the number of committed operations).
- Every request on a session first takes the session's **lease** from the store (one holder at a time: concurrent
  requests on a session are serialized across replicas) and learns the committed version. A replica whose copy is
  at that version uses it; any other rebuilds the session from the record (capture and replay: the same bits) and
  becomes its owner. Copies left on other replicas are dropped at their next request: a session lives in one place.
- A commit is a **compare-and-swap** on the version, under the lease: a replica whose copy is stale, or whose lease
  was taken over after it stopped renewing it, can never commit. The store has the edit before the response says
  "committed".
- A lease is renewed while its request runs and expires `lease_seconds` after its holder stops (a killed replica):
  the next request resumes from the last committed edit on another replica.
- The ingress gives each request an id and resends it to another replica when the one running it dies; a commit the
  store already has is answered from the store, never applied twice.

Ray is an optional extra (`pip install "sparsedit[serve]"`); nothing here is imported by `import sparsedit`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from .app import ApiError, LocalBackend, create_app
from .journal import history
from .models import ModelRegistry
from .sessions import SessionManager


__all__ = ["RayBackend", "VersionedStore", "build", "run"]

STORE_NAME = "sparsedit-session-store"


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError('sparsedit serve --ray needs Ray Serve: pip install "sparsedit[serve]"') from None
    return ray, serve


@dataclass
class _Lease:
    token: str
    replica: str
    expires: float


class VersionedStore:
    """The sessions' committed records, versions, leases and owners (the body of the `SessionStore` actor; plain
    asyncio, so it is tested without Ray).

    `lease_seconds`: how long a lease lasts without renewal. `max_sessions`, `max_per_client`: limits over every
    replica (a session being captured counts). `keep_replies`: how many committed replies per session are kept to
    answer a resent request."""

    def __init__(self, lease_seconds: float = 10.0, max_sessions: int | None = None,
                 max_per_client: int | None = None, keep_replies: int = 64,
                 idle_expiry: float | None = None):  # fmt: skip
        self.lease_seconds = lease_seconds
        self.idle_expiry = idle_expiry  # seconds unused after which a session is deleted (at the next create)
        self.used: dict[str, float] = {}  # id -> when a request last took or released it
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.keep_replies = keep_replies
        self.records: dict[str, dict] = {}  # id -> {"model", "options", "ops", "client"}
        self.versions: dict[str, int] = {}
        self.leases: dict[str, _Lease] = {}
        self.owners: dict[str, str] = {}  # id -> the replica whose copy is the committed one
        self.replies: dict[str, OrderedDict] = {}  # id -> request id -> the reply of a committed request
        self.reserved: dict[str, str | None] = {}  # ids being captured -> their client
        self.progress: dict[str, dict] = {}  # a running request's progress token -> its steps
        self._changed: asyncio.Condition | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:  # made in the running loop
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # -- creating ---------------------------------------------------------------------------------------------------
    def expire(self) -> list[str]:
        """Delete the sessions unused for `idle_expiry` seconds (never one whose lease is held); their ids."""
        if self.idle_expiry is None:
            return []
        now = time.monotonic()
        stale = [sid for sid, t in self.used.items() if now - t > self.idle_expiry and sid not in self.leases]
        for sid in stale:
            self._remove(sid)
        return stale

    def reserve(self, session_id: str, client: str | None) -> str | None:
        """Hold a place for a session about to be captured; the limit it breaks as a message, else None. Idle
        sessions past `idle_expiry` are deleted first."""
        if session_id in self.records or session_id in self.reserved:
            return None
        self.expire()
        if self.max_sessions is not None and len(self.records) + len(self.reserved) >= self.max_sessions:
            return (f"this server holds its maximum of {self.max_sessions} sessions; delete one (DELETE "
                    "/sessions/{id}) or try again later.")  # fmt: skip
        if client is not None and self.max_per_client is not None:
            mine = sum(1 for r in self.records.values() if r["client"] == client)
            mine += sum(1 for c in self.reserved.values() if c == client)
            if mine >= self.max_per_client:
                return (f"you hold this server's maximum of {self.max_per_client} sessions per client "
                        "(--max-sessions-per-client); delete one (DELETE /sessions/{id}) first.")  # fmt: skip
        self.reserved[session_id] = client
        return None

    def cancel(self, session_id: str) -> None:
        self.reserved.pop(session_id, None)

    def create(self, session_id: str, record: dict, replica: str, request_id: str | None = None,
               reply: dict | None = None) -> int:  # fmt: skip
        """Record a captured session (its capture is operation 0) owned by `replica`; returns its version."""
        self.reserved.pop(session_id, None)
        if session_id in self.records:
            return self.versions[session_id]
        self.records[session_id] = {**record, "ops": list(record["ops"])}
        self.versions[session_id] = len(record["ops"])
        self.owners[session_id] = replica
        self.used[session_id] = time.monotonic()
        self.replies[session_id] = OrderedDict()
        if request_id is not None:
            self.replies[session_id][request_id] = reply
        return self.versions[session_id]

    def exists(self, session_id: str) -> bool:
        return session_id in self.records

    # -- a request on a session -------------------------------------------------------------------------------------
    async def acquire(self, session_id: str, replica: str, local: dict | None = None, request_id: str | None = None,
                      wait: float = 120.0) -> dict:  # fmt: skip
        """Take the session's lease for one request of `replica`, waiting up to `wait` seconds for its holder.

        Returns {"status": "ok", "token", "version", "owner_was", "drop"} (the replica's copy is the committed one
        if it owned the session and its copy is at `version`; otherwise it rebuilds it from `record`), or "missing" (no such session), or "busy" (the wait ran out), or "done" with
        the stored "reply" (this request id was committed already). `local`: the replica's copies, {id: version};
        "drop" lists the ones that are stale (another replica took the session, or it was deleted): the replica
        drops them, so a session lives in one place."""
        local = dict(local or {})
        deadline = time.monotonic() + wait
        while True:
            if session_id not in self.records:
                return {"status": "missing", "drop": self._stale(replica, local, keep=session_id)}
            if request_id is not None and request_id in self.replies.get(session_id, {}):
                reply = self.replies[session_id][request_id]
                return {"status": "done", "reply": reply, "drop": self._stale(replica, local, keep=session_id)}
            lease = self.leases.get(session_id)
            now = time.monotonic()
            if lease is None or lease.expires <= now:
                break
            if now >= deadline:
                return {"status": "busy", "holder": lease.replica, "drop": self._stale(replica, local, session_id)}
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), min(deadline, lease.expires) - now + 0.01)
                except asyncio.TimeoutError:
                    pass
        token = uuid.uuid4().hex
        self.leases[session_id] = _Lease(token, replica, time.monotonic() + self.lease_seconds)
        self.used[session_id] = time.monotonic()
        owner_was = self.owners.get(session_id)
        self.owners[session_id] = replica
        drop = self._stale(replica, local, keep=session_id)
        return {"status": "ok", "token": token, "version": self.versions[session_id], "owner_was": owner_was,
                "drop": drop}  # fmt: skip

    def _stale(self, replica: str, local: dict, keep: str) -> list:
        """The copies in `local` that are not the committed ones of sessions `replica` owns: [(id, version)]."""
        return [
            (sid, v)
            for sid, v in local.items()
            if sid != keep and (sid not in self.records or self.owners.get(sid) != replica or self.versions[sid] != v)
        ]

    def renew(self, session_id: str, token: str) -> bool:
        lease = self.leases.get(session_id)
        if lease is None or lease.token != token:
            return False
        lease.expires = time.monotonic() + self.lease_seconds
        return True

    async def release(self, session_id: str, token: str) -> None:
        lease = self.leases.get(session_id)
        if lease is not None and lease.token == token:
            del self.leases[session_id]
            if session_id in self.used:
                self.used[session_id] = time.monotonic()
            await self._notify()

    def commit(self, session_id: str, token: str, version: int, op: dict, request_id: str | None = None,
               reply: dict | None = None) -> dict:  # fmt: skip
        """Append a committed operation if `token` still holds the lease and `version` is the session's version
        (compare-and-swap): {"version": the new version}, or {"stale": why}."""
        lease = self.leases.get(session_id)
        if session_id not in self.records:
            return {"stale": "the session was deleted"}
        if lease is None or lease.token != token:
            return {"stale": "this request's lease on the session ended (its replica stopped renewing it) and "
                             "another request may have taken the session"}  # fmt: skip
        if self.versions[session_id] != version:
            return {"stale": f"the session is at version {self.versions[session_id]}, not {version}"}
        self.records[session_id]["ops"].append(op)
        self.versions[session_id] = version + 1
        if request_id is not None:
            replies = self.replies[session_id]
            replies[request_id] = reply
            while len(replies) > self.keep_replies:
                replies.popitem(last=False)
        return {"version": version + 1}

    async def delete(self, session_id: str, token: str | None = None) -> bool:
        lease = self.leases.get(session_id)
        if token is not None and (lease is None or lease.token != token):
            return False
        self._remove(session_id)
        await self._notify()
        return True

    def _remove(self, session_id: str) -> None:
        for table in (self.records, self.versions, self.owners, self.replies, self.leases, self.used):
            table.pop(session_id, None)

    # -- progress of running requests (GET /progress/{token} at the ingress) -------------------------------------------
    def set_progress(self, token: str, entry: dict | None) -> None:
        if entry is None:
            self.progress.pop(token, None)
        elif token in self.progress or len(self.progress) < 4096:
            self.progress[token] = entry

    def progress_of(self, token: str) -> dict | None:
        return self.progress.get(token)

    # -- reading ------------------------------------------------------------------------------------------------------
    def record(self, session_id: str) -> dict | None:
        """The committed record with its version (what a single-process replay of the session needs)."""
        if session_id not in self.records:
            return None
        return {**self.records[session_id], "version": self.versions[session_id], "owner": self.owners[session_id]}

    def summary(self, session_id: str) -> dict | None:
        """What `GET /sessions/{id}` shows, without the states: model, committed edits, version, owner, size."""
        if session_id not in self.records:
            return None
        record = self.records[session_id]
        first = record["ops"][0]["state"]
        size = next((list(first[k].shape[:2]) for k in ("image", "labels") if k in first), None)
        return {"session": session_id, "model": record["model"], "edits": len(history(record["ops"])) - 1,
                "version": self.versions[session_id], "replica": self.owners[session_id], "size": size}  # fmt: skip

    def sessions(self) -> list[str]:
        return list(self.records)


class RayBackend:
    """The routes' backend in the ingress: each call goes to the replica holding the session (multiplexed id), with
    a request id; a call whose replica died is sent again (to another replica), which the store answers once."""

    replica = "ray-ingress"

    def __init__(self, app_name: str = "sparsedit", attempts: int = 4):
        self.app_name = app_name
        self.attempts = attempts
        self._handle = None
        self._store = None

    @property
    def handle(self):
        """The `Editors` deployment's handle, looked up in the running application on first use (the ingress is a
        copy of this object in another process)."""
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle("Editors", app_name=self.app_name)
        return self._handle

    def _call(self, session_id: str, method: str, *args):
        import ray
        from ray.serve.exceptions import ReplicaUnavailableError

        request_id = uuid.uuid4().hex
        for attempt in range(self.attempts):
            try:
                out = self.handle.options(multiplexed_model_id=session_id, method_name=method).remote(
                    request_id, *args
                ).result()  # fmt: skip
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ReplicaUnavailableError):  # fmt: skip
                if attempt == self.attempts - 1:
                    raise ApiError(503, "the replica holding this session stopped; try again.",
                                   {"Retry-After": "5"}) from None  # fmt: skip
                time.sleep(0.5 * (attempt + 1))
        if "error" in out:
            status, message, headers = out["error"]
            raise ApiError(status, message, headers)
        return out["ok"]

    def create(self, model, state, options, session_id=None, client=None, progress=None):
        return self._call(session_id or uuid.uuid4().hex[:16], "create", model, state, options, client, progress)

    def info(self, session_id):
        return self._call(session_id, "info")

    def edit(self, session_id, state, commit, progress=None):
        return self._call(session_id, "edit", state, commit, progress)

    def undo(self, session_id, progress=None):
        return self._call(session_id, "undo", progress)

    def progress_of(self, token):
        """The steps a replica reported for a running request (through the store)."""
        import ray

        if self._store is None:
            self._store = ray.get_actor(f"{STORE_NAME}:{self.app_name}")
        return ray.get(self._store.progress_of.remote(token))

    def delete(self, session_id):
        return self._call(session_id, "delete")

    def close(self):
        pass


class _Reporting(LocalBackend):
    """A replica's backend: a request's progress goes to the store too, where the ingress reads it."""

    def __init__(self, manager: SessionManager, store):
        super().__init__(manager)
        self.store = store

    def _watch(self, token, phase):
        report, done = super()._watch(token, phase)
        if report is None:
            return report, done

        def publish(step, steps):
            report(step, steps)
            self.store.set_progress.remote(token, self.progress_of(token))

        def finish():
            done()
            self.store.set_progress.remote(token, None)

        return publish, finish


def _error(status: int, message: str, headers: dict | None = None) -> dict:
    return {"error": [status, message, headers]}


class _Editors:
    """One replica's sessions (the body of the `Editors` deployment): a `SessionManager`, its copies' versions,
    and the store's leases around every request."""

    def __init__(self, manager: SessionManager, store, name: str, lease_seconds: float, wait: float = 120.0):
        self.manager = manager
        manager.replica = name
        self.backend = _Reporting(manager, store)
        self.store = store
        self.name = name
        self.lease_seconds = lease_seconds
        self.wait = wait
        self.versions: dict[str, int] = {}  # this replica's copies: the committed version each is at
        self.holding: dict[str, int] = {}  # sessions a request of this replica holds the lease of (count)

    async def _run(self, method, *args):
        try:
            return {"ok": await asyncio.to_thread(getattr(self.backend, method), *args)}
        except ApiError as e:
            return _error(e.status, e.message, e.headers)

    def _drop(self, session_id: str) -> None:
        self.versions.pop(session_id, None)
        if session_id in self.manager.sessions:
            try:
                self.manager.delete(session_id)
            except KeyError:
                pass

    def _apply_drops(self, drop) -> None:
        for sid, version in drop:
            if not self.holding.get(sid) and self.versions.get(sid) == version:
                self._drop(sid)

    async def _renew(self, session_id: str, token: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if not await self.store.renew.remote(session_id, token):
                return

    async def create(self, request_id, session_id, model, state, options, client, progress=None):
        if await self.store.exists.remote(session_id):  # a resent create whose first replica died after storing it
            return await self.request(request_id, session_id, "info")
        refused = await self.store.reserve.remote(session_id, client)
        if refused is not None:
            return _error(429 if "per client" in refused else 503, refused, {"Retry-After": "10"})
        out = await self._run("create", model, state, options, session_id, client, progress)
        if "error" in out:
            await self.store.cancel.remote(session_id)
            return out
        session = self.manager.sessions[session_id]
        record = {"model": session.model, "options": session.options, "ops": list(session.ops), "client": client}
        self.versions[session_id] = await self.store.create.remote(session_id, record, self.name, request_id,
                                                                   out["ok"])  # fmt: skip
        return out

    async def info(self, session_id):
        summary = await self.store.summary.remote(session_id)
        if summary is None:
            self._drop(session_id)
            return _error(404, f"no session {session_id!r}: it was deleted, or never made (POST /sessions).")
        session = self.manager.sessions.get(session_id)
        current = session is not None and self.versions.get(session_id) == summary["version"]
        editor = session.editor if current else None
        return {"ok": {**summary, "cache_bytes": editor.cache_bytes if editor is not None else 0,
                       "parked": editor is None}}  # fmt: skip

    async def request(self, request_id, session_id, method, *args):
        """`method` on the session under its lease, on this replica's copy at the committed version (rebuilt if it
        is not), a commit stored by compare-and-swap before it is answered."""
        self.holding[session_id] = self.holding.get(session_id, 0) + 1
        try:
            lease = await self.store.acquire.remote(session_id, self.name, dict(self.versions), request_id, self.wait)
            self._apply_drops(lease["drop"])
            if lease["status"] == "missing":
                self._drop(session_id)
                return _error(404, f"no session {session_id!r}: it was deleted, or never made (POST /sessions).")
            if lease["status"] == "busy":
                return _error(503, f"session {session_id} is busy with a long request; try again.",
                              {"Retry-After": "5"})  # fmt: skip
            if lease["status"] == "done":
                return {"ok": lease["reply"]}
            if method == "info":
                await self.store.release.remote(session_id, lease["token"])
                return await self.info(session_id)
            return await self._held(session_id, lease, request_id, method, *args)
        finally:
            self.holding[session_id] -= 1
            if not self.holding[session_id]:
                del self.holding[session_id]

    async def _held(self, session_id, lease, request_id, method, *args):
        token, version = lease["token"], lease["version"]
        renewing = asyncio.create_task(self._renew(session_id, token))
        try:
            rebuilt = 0.0
            current = lease["owner_was"] == self.name and self.versions.get(session_id) == version
            if not current or session_id not in self.manager.sessions:
                started = time.perf_counter()
                record = await self.store.record.remote(session_id)
                self._drop(session_id)
                out = await self._run_create(session_id, record)
                if "error" in out:
                    return out
                self.versions[session_id] = version
                rebuilt = time.perf_counter() - started
            if method == "delete":
                self._drop(session_id)
                await self.store.delete.remote(session_id, token)
                return {"ok": None}
            before = len(self.manager.sessions[session_id].ops)
            out = await self._run(method, session_id, *args)
            if "ok" in out and isinstance(out["ok"], dict) and "stats" in out["ok"]:
                out["ok"]["stats"]["rebuild_seconds"] = rebuilt  # this copy made from the record first
            session = self.manager.sessions.get(session_id)
            if "error" in out or session is None or len(session.ops) == before:
                return out
            done = await self.store.commit.remote(session_id, token, version, session.ops[-1], request_id,
                                                  out["ok"])  # fmt: skip
            if "stale" in done:  # never answered as committed: this copy is dropped, the next request rebuilds
                self._drop(session_id)
                return _error(409, f"the edit was not kept: {done['stale']}; send it again.")
            self.versions[session_id] = done["version"]
            return out
        finally:
            renewing.cancel()
            await self.store.release.remote(session_id, token)

    async def _run_create(self, session_id, record):
        """This replica's copy of a session, rebuilt from its committed record (capture and replay)."""

        def rebuild():
            self.manager.create(record["model"], record["ops"][0]["state"], record["options"], session_id,
                                ops=record["ops"])  # fmt: skip

        try:
            await asyncio.to_thread(LocalBackend._guard, rebuild)
        except ApiError as e:
            return _error(e.status, e.message, e.headers)
        return {"ok": None}


def replica_threads(cpus_per_replica: float) -> int:
    """torch's thread count in a replica with `cpus_per_replica` CPUs."""
    return max(1, int(cpus_per_replica))


def build(model_dirs=(), replicas: int = 2, reproducible: bool = True, max_pixels: int = 1024 * 1024,
          memory_budget=None, cpus_per_replica: float = 1.0, app_name: str = "sparsedit",
          lease_seconds: float = 10.0, max_sessions: int | None = 64, max_per_client: int | None = 16,
          token: str | None = None, max_steps: int = 100, allowed_hosts: list[str] | None = None,
          max_request_seconds: float | None = None, idle_expiry: float | None = 24 * 3600.0):  # fmt: skip
    """The Ray Serve application (bind it with `serve.run`). `lease_seconds`: how long a killed replica's sessions
    stay locked before another replica resumes them; `max_sessions`, `max_per_client`: over every replica; `token`,
    `max_steps`, `allowed_hosts`: the ingress's, as `create_app`'s; `max_request_seconds`: each replica's;
    `idle_expiry`: seconds after which an unused session is deleted (when another is made; None: never)."""
    ray, serve = _ray()

    SessionStore = ray.remote(num_cpus=0, max_restarts=0)(VersionedStore)
    threads = replica_threads(cpus_per_replica)

    # Requests queue in the replica that owns their session (they wait for its lease there): a high limit on
    # ongoing requests keeps the router from sending a session's requests elsewhere because its owner looks busy.
    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=256)  # fmt: skip
    class Editors(_Editors):
        def __init__(self, dirs, store):
            import torch

            torch.set_num_threads(threads)  # explicit: a replay elsewhere with as many gives the same bits
            ctx = serve.get_replica_context()
            replica_id = getattr(ctx, "replica_id", None)
            name = str(getattr(replica_id, "unique_id", None) or getattr(ctx, "replica_tag", "replica"))
            manager = SessionManager(ModelRegistry(dirs), workers=1, memory_budget=memory_budget,
                                     reproducible=reproducible, max_sessions=max_sessions or 64,
                                     max_request_seconds=max_request_seconds)  # fmt: skip
            super().__init__(manager, store, name, lease_seconds)

        @serve.multiplexed(max_num_models_per_replica=256)
        async def session(self, session_id: str) -> str:
            """Marks this replica as the preferred one for the session (routing only: the lease decides)."""
            return session_id

        async def _sid(self) -> str:
            return await self.session(serve.get_multiplexed_model_id())

        async def create(self, request_id, model, state, options, client=None, progress=None):
            return await _Editors.create(self, request_id, await self._sid(), model, state, options, client,
                                         progress)  # fmt: skip

        async def info(self, request_id):
            return await _Editors.info(self, await self._sid())

        async def edit(self, request_id, state, commit, progress=None):
            return await self.request(request_id, await self._sid(), "edit", state, commit, progress)

        async def undo(self, request_id, progress=None):
            return await self.request(request_id, await self._sid(), "undo", progress)

        async def delete(self, request_id):
            return await self.request(request_id, await self._sid(), "delete")

    app = create_app(ModelRegistry(model_dirs), max_pixels=max_pixels, backend=RayBackend(app_name), token=token,
                     max_steps=max_steps, allowed_hosts=allowed_hosts)  # fmt: skip

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, editors):
            self.editors = editors  # bound so Serve deploys it; the routes find it by name

    store = SessionStore.options(name=f"{STORE_NAME}:{app_name}", get_if_exists=True).remote(
        lease_seconds, max_sessions, max_per_client, 64, idle_expiry
    )
    return Ingress.bind(Editors.bind(list(map(str, model_dirs)), store))


def run(host: str = "127.0.0.1", port: int = 8000, model_dirs=(), replicas: int = 2, blocking: bool = True, **kwargs):
    """Start Ray (locally unless `RAY_ADDRESS` says otherwise) and serve the app on `host:port`."""
    ray, serve = _ray()

    from . import LOOPBACK_NAMES, is_loopback

    if not ray.is_initialized():
        ray.init(include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    kwargs.setdefault("allowed_hosts", LOOPBACK_NAMES if is_loopback(host) else None)
    serve.run(build(model_dirs, replicas, app_name="sparsedit", **kwargs), name="sparsedit", route_prefix="/",
              blocking=blocking)  # fmt: skip
