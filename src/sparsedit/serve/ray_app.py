"""`sparsedit serve --ray --replicas N`: the same app as a Ray Serve application, sessions spread over replicas.

A session's caches live on one replica, so every request of a session must reach that replica. Ray Serve's model
multiplexing does exactly this when the session id is the multiplexed model id: the router sends a request to a
replica that has that id loaded. The ingress (the FastAPI app of `app.py`, with `RayBackend`) makes each new
session's id and calls the `Editors` deployment with it. Every committed state of every session is also written to
a `SessionStore` actor, so when a replica is lost, the next request of one of its sessions lands on another replica,
whose multiplexed loader captures the session again from its last committed state: no committed edit is lost.

Ray is an optional extra (`pip install "sparsedit[serve]"`); nothing here is imported by `import sparsedit`.
"""

from __future__ import annotations

import asyncio
import uuid

from .app import ApiError, LocalBackend, create_app
from .models import ModelRegistry
from .sessions import SessionManager


__all__ = ["RayBackend", "build", "run"]


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError('sparsedit serve --ray needs Ray Serve: pip install "sparsedit[serve]"') from None
    return ray, serve


class RayBackend:
    """The routes' backend in the ingress: each call goes to the replica holding the session (multiplexed id)."""

    replica = "ray-ingress"

    def __init__(self, app_name: str = "sparsedit"):
        self.app_name = app_name
        self._handle = None

    @property
    def handle(self):
        """The `Editors` deployment's handle, looked up in the running application on first use (the ingress is a
        copy of this object in another process)."""
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle("Editors", app_name=self.app_name)
        return self._handle

    def _call(self, session_id: str, method: str, *args):
        out = self.handle.options(multiplexed_model_id=session_id, method_name=method).remote(*args).result()
        if "error" in out:
            status, message, headers = out["error"]
            raise ApiError(status, message, headers)
        return out["ok"]

    def create(self, model, state, options, session_id=None, client=None):
        # The per-client limit is not applied across replicas yet (each replica sees only its own sessions).
        return self._call(session_id or uuid.uuid4().hex[:16], "create", model, state, options)

    def info(self, session_id):
        return self._call(session_id, "info")

    def edit(self, session_id, state, commit):
        return self._call(session_id, "edit", state, commit)

    def undo(self, session_id):
        return self._call(session_id, "undo")

    def delete(self, session_id):
        return self._call(session_id, "delete")

    def close(self):
        pass


def build(model_dirs=(), replicas: int = 2, reproducible: bool = True, max_pixels: int = 1024 * 1024,
          memory_budget=None, cpus_per_replica: float = 1.0, app_name: str = "sparsedit"):  # fmt: skip
    """The Ray Serve application (bind it with `serve.run`)."""
    ray, serve = _ray()

    @ray.remote(num_cpus=0)
    class SessionStore:
        """Every session's model, options and committed states, outside the replicas."""

        def __init__(self):
            self.records = {}

        def put(self, session_id, record):
            self.records[session_id] = record

        def get(self, session_id):
            return self.records.get(session_id)

        def delete(self, session_id):
            self.records.pop(session_id, None)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica})
    class Editors:
        def __init__(self, dirs, store):
            ctx = serve.get_replica_context()
            replica_id = getattr(ctx, "replica_id", None)
            name = getattr(replica_id, "unique_id", None) or getattr(ctx, "replica_tag", "replica")
            self.manager = SessionManager(ModelRegistry(dirs), workers=1, memory_budget=memory_budget,
                                          reproducible=reproducible)  # fmt: skip
            self.manager.replica = str(name)
            self.backend = LocalBackend(self.manager)
            self.store = store

        @serve.multiplexed(max_num_models_per_replica=256)
        async def session(self, session_id: str) -> str:
            """The session on this replica: made by `create`, or captured again from the store after its replica
            was lost (its last committed state, with the whole history kept)."""
            if session_id not in self.manager.sessions:
                record = await self.store.get.remote(session_id)
                if record is not None:
                    await asyncio.to_thread(self.manager.create, record["model"], record["states"][-1],
                                            record["options"], session_id, record["states"])  # fmt: skip
            return session_id

        async def _run(self, method, *args):
            try:
                return {"ok": await asyncio.to_thread(getattr(self.backend, method), *args)}
            except ApiError as e:
                return {"error": [e.status, e.message, e.headers]}

        async def _save(self, session_id):
            session = self.manager.sessions.get(session_id)
            if session is not None:
                record = {"model": session.model, "options": session.options, "states": list(session.states)}
                await self.store.put.remote(session_id, record)

        async def create(self, model, state, options):
            session_id = serve.get_multiplexed_model_id()
            out = await self._run("create", model, state, options, session_id)
            if "ok" in out:
                await self._save(session_id)
                await self.session(session_id)  # loaded here: the router keeps the session on this replica
            return out

        async def info(self):
            session_id = await self.session(serve.get_multiplexed_model_id())
            return await self._run("info", session_id)

        async def edit(self, state, commit):
            session_id = await self.session(serve.get_multiplexed_model_id())
            out = await self._run("edit", session_id, state, commit)
            if "ok" in out and commit:
                await self._save(session_id)
            return out

        async def undo(self):
            session_id = await self.session(serve.get_multiplexed_model_id())
            out = await self._run("undo", session_id)
            if "ok" in out:
                await self._save(session_id)
            return out

        async def delete(self):
            session_id = await self.session(serve.get_multiplexed_model_id())
            out = await self._run("delete", session_id)
            await self.store.delete.remote(session_id)
            return out

    app = create_app(ModelRegistry(model_dirs), max_pixels=max_pixels, backend=RayBackend(app_name))

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, editors):
            self.editors = editors  # bound so Serve deploys it; the routes find it by name

    return Ingress.bind(Editors.bind(list(map(str, model_dirs)), SessionStore.remote()))


def run(host: str = "127.0.0.1", port: int = 8000, model_dirs=(), replicas: int = 2, blocking: bool = True, **kwargs):
    """Start Ray (locally unless `RAY_ADDRESS` says otherwise) and serve the app on `host:port`."""
    ray, serve = _ray()

    if not ray.is_initialized():
        ray.init(include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(model_dirs, replicas, app_name="sparsedit", **kwargs), name="sparsedit", route_prefix="/",
              blocking=blocking)  # fmt: skip
