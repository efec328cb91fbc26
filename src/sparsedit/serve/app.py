"""The HTTP app of `sparsedit serve`: the web editor at `/` and a JSON API (images are base64-encoded PNG strings).

    GET  /health                     {"status": "ok"}
    GET  /models                     {"models": [{"name", "kind", "takes", ...}]}
    GET  /scenes/{seed}              a procedural scene to start from: {"image", "labels", "labels_rgb", "caption"}
    POST /sessions                   {"model", "image" | "labels", "prompt"?, "strength"?, "steps"?, "seed"?,
                                      "guidance"?} → 201
    POST /sessions/{id}/edits        {"image"? | "mask"? | "labels"? | "prompt"?, "commit"?} → {"image", "stats", "edit"}
    POST /sessions/{id}/undo         back to the previous committed state
    GET  /sessions/{id}              {"session", "model", "edits", "cache_bytes"}
    DELETE /sessions/{id}            204

Errors are `{"error": "..."}` with 400/422 (bad input), 404 (unknown session or model), 413 (over `max_pixels`),
503 (over capacity, with `Retry-After`), 507 (a commit that could not be written to the state directory: not kept). A failed request leaves its session as it was (the editors' calls are
transactions, and the session's state changes only after them).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

import torch
from fastapi import Request  # resolved by name in a route's signature (this module is the server's only)

from ..cache import CacheBudgetError
from .cost import RequestTooSlow
from .models import ImageTooLarge, ModelRegistry, array_to_png, png_to_array, region_to_png, tensor_to_png
from .sessions import ClientLimit, JournalError, OverCapacity, SessionManager, UnknownSession


__all__ = ["create_app"]

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _b64(s: str) -> str:
    return base64.b64encode(s).decode("ascii")


class LocalBackend:
    """The sessions of this process (`SessionManager`), as plain data: what the routes and a Ray replica call."""

    def __init__(self, manager: SessionManager):
        self.manager = manager
        self.progress: dict[str, dict] = {}  # a running request's progress token -> its steps (GET /progress)

    def _watch(self, token: str | None, phase: str):
        """The step callback of a request that named a progress `token`, and what forgets it when it ends."""
        if token is None or len(self.progress) >= 4096:
            return None, lambda: None
        entry = {"phase": phase, "step": 0, "steps": None}
        self.progress[token] = entry

        def report(done: int, steps: int) -> None:
            entry["step"], entry["steps"] = int(done), int(steps)

        return report, lambda: self.progress.pop(token, None)

    def progress_of(self, token: str) -> dict | None:
        entry = self.progress.get(token)
        return None if entry is None else dict(entry)

    @property
    def replica(self) -> str:
        return self.manager.replica

    def _stats(self, stats, region, session, seconds=None) -> dict:
        out = {
            "seconds": float(stats.get("seconds", 0.0) if seconds is None else seconds),
            "macs_dense": int(stats.get("macs_dense", 0)),
            "macs_sparse": int(stats.get("macs_sparse", 0)),
            "region_fraction": float(stats.get("region_fraction", 0.0) or 0.0),
            "replica": self.manager.replica,
            "capture_seconds": session.capture_seconds,  # a dense run of the same model that also fills the caches
            "dense_seconds": self._dense_seconds(session),  # a plain call on this input size: the honest reference
            "cache_bytes": int(stats.get("cache_bytes", 0) or 0),
            "ran_dense": stats.get("ran_dense") or stats.get("dense_run"),
        }
        png = region_to_png(region)
        if png is not None:
            out["region"] = _b64(png)
        return out

    def _dense_seconds(self, session) -> float | None:
        """The measured plain call of the session's model on its input size and options (`--measure-dense`)."""
        from .models import dense_key

        model = self.manager.registry.get(session.model)
        return model.dense_seconds.get(dense_key(model, session.options, session.states[0]))

    @staticmethod
    def _guard(fn):
        try:
            return fn()
        except UnknownSession as e:
            raise ApiError(404, e.args[0]) from None
        except KeyError as e:
            raise ApiError(404, e.args[0] if e.args else str(e)) from None
        except ClientLimit as e:
            raise ApiError(429, str(e)) from None
        except OverCapacity as e:
            raise ApiError(503, str(e), {"Retry-After": "10"}) from None
        except CacheBudgetError as e:
            raise ApiError(
                413, f"this session's caches would not fit the server's limit (--memory-budget): {e}"
            ) from None
        except JournalError as e:
            raise ApiError(507, str(e)) from None
        except RequestTooSlow as e:
            raise ApiError(422, str(e)) from None
        except (ValueError, TypeError) as e:
            raise ApiError(422, str(e)) from None

    def create(self, model: str, state: dict, options: dict, session_id: str | None = None,
               client: str | None = None, progress: str | None = None) -> dict:  # fmt: skip
        report, done = self._watch(progress, "capture")
        try:
            session, image = self._guard(
                lambda: self.manager.create(model, state, options, session_id, client=client, progress=report)
            )
        finally:
            done()
        stats = self._stats(session.capture_stats, None, session, session.capture_seconds)
        return {"session": session.id, "image": _b64(tensor_to_png(image)), "stats": stats}

    def info(self, session_id: str) -> dict:
        session = self._guard(lambda: self.manager.get(session_id))
        first = session.states[0]
        size = next((list(first[k].shape[:2]) for k in ("image", "labels") if k in first), None)
        cache = session.editor.cache_bytes if session.editor is not None else 0
        return {"session": session.id, "model": session.model, "edits": session.edits, "cache_bytes": cache,
                "parked": session.parked is not None or session.editor is None, "replica": self.manager.replica,
                "size": size}  # fmt: skip

    def edit(self, session_id: str, state: dict, commit: bool, progress: str | None = None) -> dict:
        session = self._guard(lambda: self.manager.get(session_id))
        report, done = self._watch(progress, "edit")
        try:
            image, stats, region = self._guard(lambda: self.manager.edit(session_id, state, commit, report))
        finally:
            done()
        return {
            "image": _b64(tensor_to_png(image)),
            "stats": self._stats(stats, region, session),
            "edit": session.edits,
        }

    def undo(self, session_id: str, progress: str | None = None) -> dict:
        session = self._guard(lambda: self.manager.get(session_id))
        report, done = self._watch(progress, "undo")
        try:
            image, stats, region = self._guard(lambda: self.manager.undo(session_id, report))
        finally:
            done()
        state = session.states[-1]
        restored = state.get("image", state.get("labels"))  # the input as it now is, for the editor's canvas
        return {"image": _b64(tensor_to_png(image)), "stats": self._stats(stats, region, session),
                "edit": session.edits, "input": None if restored is None else _b64(array_to_png(restored))}  # fmt: skip

    def delete(self, session_id: str) -> None:
        self._guard(lambda: self.manager.delete(session_id))

    def close(self) -> None:
        self.manager.close()


def create_app(models: ModelRegistry | None = None, workers: int = 2, memory_budget: int | None = None,
               max_pixels: int = 1024 * 1024, max_sessions: int = 64, replica: str | None = None,
               reproducible: bool = False, backend=None, max_body: int | None = None,
               allowed_hosts: list[str] | None = None, state_dir=None, idle_expiry: float | None = None,
               token: str | None = None, max_steps: int = 100, max_per_client: int | None = None,
               session_limit: int | None = None, max_request_seconds: float | None = None,
               measure_dense: bool = False):  # fmt: skip
    """The FastAPI app. `models`: the registry (default: the shipped scene models). `reproducible`: every edit runs
    sparse, the same bits on any machine (otherwise the calibrated choice runs dense where sparse would be slower).
    `backend`: where sessions live (default: this process, `LocalBackend`; `ray_app` puts them on Ray replicas).
    `max_body`: the largest request body in bytes, refused (413) before it is read (default: what a base64 PNG of
    `max_pixels` RGB pixels can take, uncompressed). `allowed_hosts`: the `Host` header values served (e.g. the
    loopback names when bound to loopback, against DNS rebinding); `None`: any. `state_dir`: where sessions are
    journaled and recovered from after a restart (`None`: a temporary directory, nothing survives the process);
    `idle_expiry`: seconds after which an unused session is deleted. `token`: a bearer token every route requires
    (`Authorization: Bearer <token>`; the page, opened once as `/?token=<token>`, keeps it in a same-site cookie).
    `max_steps`: the most denoising steps a session may ask for; `max_per_client`: the most sessions one client
    address may hold (429 beyond it); `session_limit`: the most bytes one session's caches may need, predicted by
    the library before its capture runs (413 beyond it); `max_request_seconds`: the longest a capture may be
    predicted to take (`cost.CostModel`, measured once per model; 422 beyond it; `None`: not checked).
    `measure_dense`: after the first capture of each model, input size and options, time one plain call of the model
    on that input (`dense_seconds` in the statistics: the page's reference for an edit's speed-up)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    registry = models or ModelRegistry()
    if backend is None:
        manager = SessionManager(registry, workers=workers, memory_budget=memory_budget, max_sessions=max_sessions,
                                 reproducible=reproducible, state_dir=state_dir, idle_expiry=idle_expiry,
                                 max_per_client=max_per_client, session_limit=session_limit,
                                 max_request_seconds=max_request_seconds, measure_dense=measure_dense)  # fmt: skip
        if replica:
            manager.replica = replica
        backend = LocalBackend(manager)
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        backend.close()

    app = FastAPI(title="sparsedit", version="0.1.0", lifespan=lifespan)
    app.state.backend = backend

    @app.exception_handler(ApiError)
    def _api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse({"error": validation_message(e.errors())}, status_code=422)

    _info_routes(app, backend, registry)
    _session_routes(app, backend, registry, max_pixels, max_steps)
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(BodyLimit, limit=max_body if max_body is not None else default_max_body(max_pixels))
    if token:
        app.add_middleware(TokenAuth, token=token)
    return app


class TokenAuth:
    """ASGI middleware: every request carries the server's token, as `Authorization: Bearer <token>` or the
    `sparsedit_token` cookie, else a JSON 401. `GET /?token=<token>` (the page, opened from the link the server
    prints) sets that cookie, so the page's own requests carry it."""

    COOKIE = "sparsedit_token"

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def _given(self, scope) -> tuple[bytes | None, bool]:
        import hmac
        from http.cookies import SimpleCookie
        from urllib.parse import parse_qs

        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        candidates = [auth[7:].strip()] if auth[:7].lower() == b"bearer " else []
        cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        if self.COOKIE in cookie:
            candidates.append(cookie[self.COOKIE].value.encode())
        from_query = False
        if scope.get("path") == "/" and scope.get("method") == "GET":
            q = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            if q:
                candidates.append(q[0].encode())
                from_query = True
        ok = any(hmac.compare_digest(c, self.token) for c in candidates)
        return ok, from_query

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ok, from_query = self._given(scope)
        if not ok:
            body = json.dumps({"error": "this server needs its token: send `Authorization: Bearer <token>` (or open "
                                        "the page as /?token=<token>)."}).encode()  # fmt: skip
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b"Bearer")]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        if not from_query:
            return await self.app(scope, receive, send)
        cookie = f"{self.COOKIE}={self.token.decode()}; HttpOnly; SameSite=Strict; Path=/".encode()

        async def with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, with_cookie)


def default_max_body(max_pixels: int) -> int:
    """A request body that can carry a base64 PNG of `max_pixels` RGB pixels stored uncompressed, and its fields."""
    return 4 * (3 * max_pixels + max_pixels // 16) // 3 + (1 << 20)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a JSON 413 before the app reads it (from its
    `Content-Length`, or while a chunked body streams in, buffered up to the limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        # No length (a chunked body): read it here up to the limit, then hand the app what was read.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await self._refuse(send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = iter(messages)

        async def buffered():
            return next(replay, None) or await receive()

        await self.app(scope, buffered, send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"the request body is over this server's limit of {self.limit} bytes (it follows "
                                    "--max-pixels); send a smaller image."}).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def _info_routes(app, backend, registry) -> None:
    """The page, health, the models offered and the procedural scenes."""
    from fastapi.responses import FileResponse

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    def health():
        return {"status": "ok", "replica": backend.replica}

    @app.get("/models")
    def list_models():
        return {"models": registry.describe()}

    @app.get("/scenes/{seed}")
    def scene(seed: int, size: int = 64):
        return scene_pngs(seed, size)


def _session_routes(app, backend, registry, max_pixels: int, max_steps: int = 100) -> None:
    """Sessions: create (a dense capture), edit (sparse), undo, read and delete."""
    from fastapi import Body
    from fastapi.responses import Response

    @app.post("/sessions", status_code=201)
    def create_session(request: Request, body: dict = Body(...)):
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(422, "model is required: one of GET /models.")
        try:
            model = registry.get(name)
        except KeyError as e:
            raise ApiError(404, e.args[0]) from None
        state = state_from(body, model, max_pixels)
        need = [k for k in model.takes if k in ("image", "labels") and k not in state]
        if need:
            raise ApiError(422, f"{model.name} starts from {' or '.join(need)}: send it as a base64 PNG.")
        client = request.client.host if request.client is not None else None
        return backend.create(name, state, capture_options(body, max_steps), client=client,
                              **progress_token(body.get("progress")))  # fmt: skip

    @app.post("/sessions/{session_id}/edits")
    def edit(session_id: str, body: dict = Body(...)):
        info = backend.info(session_id)
        model = registry.get(info["model"])
        state = state_from(body, model, max_pixels, info["size"])
        if not state:
            raise ApiError(422, f"an edit sends at least one of {', '.join(model.takes)}.")
        commit = body.get("commit", True)
        if not isinstance(commit, bool):
            raise ApiError(422, "commit must be true or false.")
        return backend.edit(session_id, state, commit, **progress_token(body.get("progress")))

    @app.post("/sessions/{session_id}/undo")
    def undo(session_id: str, progress: str | None = None):
        return backend.undo(session_id, **progress_token(progress))

    @app.get("/progress/{token}")
    def progress(token: str):
        """The steps done so far by the running request that sent `"progress": token` (404 once it has ended, or
        where the backend does not report progress)."""
        entry = backend.progress_of(token) if hasattr(backend, "progress_of") else None
        if entry is None:
            raise ApiError(404, f"no request in progress with progress token {token!r}.")
        return entry

    @app.get("/sessions/{session_id}")
    def get_session(session_id: str):
        info = backend.info(session_id)
        info.pop("size", None)
        return info

    @app.delete("/sessions/{session_id}", status_code=204)
    def delete_session(session_id: str):
        backend.delete(session_id)
        return Response(status_code=204)


# -- requests in: plain helpers of the routes ---------------------------------------------------------------------------
def progress_token(value) -> dict:
    """`{"progress": token}` for a backend call, from a request's optional `progress` field (a client-made id of up
    to 64 letters, digits, `-` or `_`, polled at `GET /progress/{token}`)."""
    if value is None:
        return {}
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ApiError(422, "progress must be a token of 1 to 64 letters, digits, '-' or '_' (then poll "
                            "GET /progress/{token}).")  # fmt: skip
    return {"progress": value}


def validation_message(errors) -> str:
    """FastAPI's validation errors as one line naming each field."""
    parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}" for err in errors]
    return "invalid request: " + "; ".join(parts)


def decode_png(value, what: str, max_pixels: int, size: tuple[int, int] | None = None, read: str = "rgb"):
    """A base64 PNG field of a request body as an array, checked against `--max-pixels` and the session's size."""
    if not isinstance(value, str):
        raise ApiError(422, f"{what} must be a base64-encoded PNG string.")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what} is not valid base64; send a base64-encoded PNG.") from None
    try:
        a = png_to_array(data, what, read, max_pixels)
    except ImageTooLarge as e:
        raise ApiError(413, str(e)) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if size is not None and tuple(a.shape[:2]) != tuple(size):
        raise ApiError(422, f"{what} is {a.shape[1]}x{a.shape[0]} pixels but this session's image is "
                            f"{size[1]}x{size[0]}; an edit keeps the size (start a new session for another).")  # fmt: skip
    return a


# An edit's PNG inputs: how each is read, and what an error calls it.
_PICTURES = {"image": ("rgb", "an image"), "labels": ("ids", "labels"), "mask": ("ids", "a mask")}


def state_from(body: dict, model, max_pixels: int, size=None) -> dict:
    """The session state a request body sends (its pictures decoded, its prompt), checked against what `model`
    takes."""
    state = {}
    for key, (read, called) in _PICTURES.items():
        if body.get(key) is None:
            continue
        if key not in model.takes:
            raise ApiError(422, f"{model.name} takes {', '.join(model.takes)}, not {called}.")
        state[key] = decode_png(body[key], key, max_pixels, size, read)
    if body.get("prompt") is not None:
        if "prompt" not in model.takes:
            raise ApiError(422, f"{model.name} takes no prompt.")
        if not isinstance(body["prompt"], str):
            raise ApiError(422, "prompt must be a string.")
        state["prompt"] = body["prompt"]
    return state


def capture_options(body: dict, max_steps: int = 100) -> dict:
    """A new session's generation options (`None`: the model's default), each a number, `steps` at most
    `max_steps`."""
    options = {k: body.get(k) for k in ("strength", "steps", "seed", "guidance")}
    for k, v in options.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ApiError(422, f"{k} must be a number.")
    for k in ("steps", "seed"):
        if options[k] is not None and (options[k] != int(options[k]) or options[k] < (k == "steps")):
            raise ApiError(422, f"{k} must be a whole number{' of at least 1' if k == 'steps' else ', 0 or more'}.")
    if options["steps"] is not None and options["steps"] > max_steps:
        raise ApiError(422, f"steps={int(options['steps'])} is over this server's limit of {max_steps} (--max-steps).")
    return options


def scene_pngs(seed: int, size: int) -> dict:
    """A procedural scene (`GET /scenes/{seed}`): its image, label map (ids and colours) and caption as PNGs."""
    from ..data import captions, scenes

    if not 8 <= size <= 512:
        raise ApiError(422, "size must be between 8 and 512 pixels.")
    s = scenes.sample(1, size, seed=seed)
    image = ((s["image"][0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = s["labels"][0].to(torch.uint8).numpy()
    return {"image": _b64(array_to_png(image)), "labels": _b64(array_to_png(labels)),
            "labels_rgb": _b64(array_to_png(scenes.to_rgb(s["labels"][0]).numpy())),
            "caption": captions.caption(s["labels"][0])}  # fmt: skip
