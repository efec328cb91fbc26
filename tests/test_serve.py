"""`sparsedit serve` (issue 20): the JSON API in process and over a real uvicorn on 127.0.0.1, its errors, sessions
that survive failed requests and parking, and a bounded load test."""

import base64
import io
import resource
import socket
import statistics
import threading
import time

import numpy as np
import pytest
from PIL import Image

from sparsedit.serve.loadtest import b64png, unpng  # noqa: F401  (other test modules import them from here)


pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from sparsedit.serve import ModelRegistry, create_app  # noqa: E402


FAST = {"steps": 10, "strength": 0.5, "seed": 0}  # 5 denoising steps: quick, and still an SDEdit


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry()  # loads each shipped model once for the module


@pytest.fixture
def client(registry):
    with TestClient(create_app(registry, max_pixels=128 * 128, max_sessions=20, reproducible=True)) as c:
        yield c


@pytest.fixture(scope="module")
def scene(registry):
    with TestClient(create_app(registry)) as c:
        s = c.get("/scenes/1").json()
    return unpng(s["image"]).copy(), unpng(s["labels"]).copy()


def stroke(a, y, x, colour=(30, 60, 200), side=8):
    b = a.copy()
    b[y : y + side, x : x + side] = colour
    return b


def test_health_models_and_a_ddpm_session(client, scene):
    assert client.get("/health").json()["status"] == "ok"
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert {"scene-ddpm", "scene-spade"} <= set(models) and models["scene-spade"]["kind"] == "gan"
    assert client.get("/").headers["content-type"].startswith("text/html")
    image, _ = scene
    r = client.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST})
    assert r.status_code == 201, r.text
    sid, first = r.json()["session"], unpng(r.json()["image"])
    assert first.shape == (64, 64, 3)
    r = client.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(image, 40, 8))})
    assert r.status_code == 200, r.text
    body = r.json()
    stats = body["stats"]
    assert body["edit"] == 1 and 0 < stats["region_fraction"] < 0.1 and stats["replica"]
    assert 0 < stats["macs_sparse"] < stats["macs_dense"] and stats["seconds"] > 0
    region = unpng(stats["region"]) > 0
    edited = unpng(body["image"])
    far = ~np.pad(region, 4)[4:-4, 4:-4]  # outside the recomputed region: the capture's pixels
    assert np.array_equal(edited[far & ~region], first[far & ~region])
    info = client.get(f"/sessions/{sid}").json()
    assert info["edits"] == 1 and info["cache_bytes"] > 0 and info["model"] == "scene-ddpm"
    r = client.post(f"/sessions/{sid}/undo")
    assert r.status_code == 200 and r.json()["edit"] == 0
    assert np.array_equal(unpng(r.json()["input"]), image)
    assert client.post(f"/sessions/{sid}/undo").status_code == 422  # nothing left to undo
    assert client.delete(f"/sessions/{sid}").status_code == 204
    assert client.get(f"/sessions/{sid}").status_code == 404


def test_a_gan_session_edits_labels(client, scene):
    _, labels = scene
    r = client.post("/sessions", json={"model": "scene-spade", "labels": b64png(labels)})
    assert r.status_code == 201, r.text
    sid = r.json()["session"]
    painted = labels.copy()
    painted[10:20, 30:44] = 7  # trees
    r = client.post(f"/sessions/{sid}/edits", json={"labels": b64png(painted)})
    assert r.status_code == 200, r.text
    assert 0 < r.json()["stats"]["region_fraction"] < 0.1
    bad = labels.copy()
    bad[0, 0] = 200
    r = client.post(f"/sessions/{sid}/edits", json={"labels": b64png(bad)})
    assert r.status_code == 422 and "class id 200" in r.json()["error"]


def test_errors_are_json_and_leave_the_session_intact(client, scene):
    image, _ = scene
    r = client.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST})
    sid = r.json()["session"]
    cases = [
        ({"image": "not base64!"}, 400, "base64"),
        ({"image": base64.b64encode(b"\x89PNG garbage").decode()}, 400, "PNG"),
        ({"image": b64png(image[:32, :32])}, 422, "32x32"),
        ({"image": b64png(np.zeros((256, 256, 3), np.uint8))}, 413, "max-pixels"),
        ({"labels": b64png(image[..., 0])}, 422, "not labels"),
        ({}, 422, "at least one"),
        ({"image": b64png(image), "commit": "yes"}, 422, "commit"),
    ]
    for body, status, words in cases:
        r = client.post(f"/sessions/{sid}/edits", json=body)
        assert r.status_code == status, (body.keys(), r.text)
        assert words in r.json()["error"]
    assert client.post("/sessions/nope/edits", json={"image": b64png(image)}).status_code == 404
    r = client.post("/sessions", json={"model": "no-such-model", "image": b64png(image)})
    assert r.status_code == 404 and "GET /models" in r.json()["error"]
    r = client.post("/sessions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    # After all that, the session edits as a fresh one does.
    got = client.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(image, 40, 8))}).json()
    assert got["edit"] == 1
    fresh = client.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).json()["session"]
    want = client.post(f"/sessions/{fresh}/edits", json={"image": b64png(stroke(image, 40, 8))}).json()
    assert got["image"] == want["image"]


def test_over_capacity_is_503_with_retry_after(registry, scene):
    image, _ = scene
    with TestClient(create_app(registry, max_sessions=1)) as c:
        assert c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).status_code == 201
        r = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST})
        assert r.status_code == 503 and r.headers["retry-after"] and "maximum" in r.json()["error"]


def test_parked_sessions_resume_with_their_edits(registry, scene):
    image, labels = scene
    with TestClient(
        create_app(registry, memory_budget=1, reproducible=True)
    ) as c:  # every idle session is parked at once
        a = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).json()["session"]
        g = c.post("/sessions", json={"model": "scene-spade", "labels": b64png(labels)}).json()["session"]
        first = c.post(f"/sessions/{a}/edits", json={"image": b64png(stroke(image, 40, 8))}).json()
        assert c.get(f"/sessions/{g}").json()["parked"]
        c.post(f"/sessions/{g}/edits", json={"labels": b64png(stroke(labels, 4, 4, 7))})
        assert c.get(f"/sessions/{a}").json()["parked"]
        second = c.post(f"/sessions/{a}/edits", json={"image": b64png(stroke(stroke(image, 40, 8), 8, 40))}).json()
        assert second["edit"] == 2
    with TestClient(create_app(registry, reproducible=True)) as c:  # the same edits, never parked
        a = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).json()["session"]
        want1 = c.post(f"/sessions/{a}/edits", json={"image": b64png(stroke(image, 40, 8))}).json()
        want2 = c.post(f"/sessions/{a}/edits", json={"image": b64png(stroke(stroke(image, 40, 8), 8, 40))}).json()
    assert first["image"] == want1["image"] and second["image"] == want2["image"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server(registry):
    """A real uvicorn on 127.0.0.1, in a thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry, workers=2, reproducible=True), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_a_real_server_on_loopback(live_server, scene):
    image, _ = scene
    with httpx.Client(base_url=live_server, timeout=60) as c:
        assert c.get("/health").json()["status"] == "ok"
        sid = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).json()["session"]
        r = c.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(image, 40, 8))})
        assert r.status_code == 200 and r.json()["edit"] == 1


def test_load_6_sessions_6_edits_none_lost(live_server, scene):
    """Loopback only, bounded: 6 concurrent sessions (both shipped models) x 6 committed edits (the Ray load test
    covers more, with a replica killed). Every result must equal a one-session replay of the same requests; p50/p95
    latency and peak memory are printed."""
    image, labels = scene
    rng = np.random.default_rng(0)
    plans = []
    for k in range(6):
        gan = k % 2 == 1
        current, steps = (labels if gan else image).copy(), []
        for _ in range(6):
            y, x = (int(v) for v in rng.integers(0, 56, 2))
            current = stroke(
                current, y, x, int(rng.integers(0, 9)) if gan else tuple(int(v) for v in rng.integers(0, 255, 3))
            )
            steps.append(current.copy())
        plans.append(
            ("scene-spade" if gan else "scene-ddpm", "labels" if gan else "image", labels if gan else image, steps)
        )

    def play(base, plan, out, latencies):
        model, key, first, steps = plan
        with httpx.Client(base_url=base, timeout=120) as c:
            body = {"model": model, key: b64png(first), **(FAST if key == "image" else {})}
            sid = c.post("/sessions", json=body).json()["session"]
            for s in steps:
                t0 = time.perf_counter()
                r = c.post(f"/sessions/{sid}/edits", json={key: b64png(s)})
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                out.append(r.json()["image"])
            c.delete(f"/sessions/{sid}")

    results, latencies, errors = [[] for _ in plans], [], []

    def worker(i):
        try:
            play(live_server, plans[i], results[i], latencies)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - started
    assert not errors, errors
    q = statistics.quantiles(latencies, n=20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nload: {len(latencies)} edits in {wall:.1f} s, p50 {statistics.median(latencies):.3f} s, "
          f"p95 {q[18]:.3f} s, peak RSS {peak:.2f} GiB")  # fmt: skip
    for i, plan in enumerate(plans):  # one session alone, the same requests
        want = []
        play(live_server, plan, want, [])
        assert results[i] == want, f"session {i}: a concurrent result differs from its one-session replay"


def test_a_client_that_disconnects_mid_edit_still_has_its_commit_kept(live_server, scene):
    image, _ = scene
    with httpx.Client(base_url=live_server, timeout=60) as c:
        sid = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).json()["session"]
    with httpx.Client(base_url=live_server, timeout=0.05) as hasty:  # gives up long before the edit is done
        with pytest.raises(httpx.TimeoutException):
            hasty.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(image, 40, 8))})
    with httpx.Client(base_url=live_server, timeout=60) as c:
        # The rule (docs/serve.md): a request the server received runs to its end, and a commit is kept, whether or
        # not its client is still there to read the answer; GET /sessions/{id} tells the outcome.
        deadline = time.time() + 60
        while c.get(f"/sessions/{sid}").json()["edits"] != 1 and time.time() < deadline:
            time.sleep(0.1)
        assert c.get(f"/sessions/{sid}").json()["edits"] == 1
        r = c.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(stroke(image, 40, 8), 8, 40))})
        assert r.status_code == 200 and r.json()["edit"] == 2


def test_a_local_diffusers_pipeline_directory_is_served(tmp_path):
    from sparsedit.testing import tiny_sd

    tiny_sd(tmp_path / "tok", "img2img").save_pretrained(str(tmp_path / "tiny-sd"))
    registry = ModelRegistry([tmp_path / "tiny-sd"])
    with TestClient(create_app(registry, reproducible=True)) as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert models["tiny-sd"]["kind"] == "sd-img2img" and "prompt" in models["tiny-sd"]["takes"]
        image = np.asarray(Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)))
        r = c.post("/sessions", json={"model": "tiny-sd", "image": b64png(image), "prompt": "a red house", "steps": 4})
        assert r.status_code == 201, r.text
        sid = r.json()["session"]
        r = c.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(image, 40, 8))})
        assert r.status_code == 200 and r.json()["edit"] == 1, r.text
        assert 0 < r.json()["stats"]["region_fraction"] < 0.2
    with pytest.raises(ValueError, match="model_index.json"):
        ModelRegistry([tmp_path / "tok"])


def test_the_shipped_text_model_takes_prompts(client):
    """scene-sd (txt2img) and its img2img twin are served; a scene comes with its caption, and a prompt edit
    regenerates only a region of the image."""
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert models["scene-sd"]["kind"] == "sd-txt2img" and models["scene-sd"]["takes"] == ["prompt"]
    assert models["scene-sd-img2img"]["takes"] == ["image", "prompt"]
    import torch

    from sparsedit.data import captions

    s = client.get("/scenes/1000004").json()
    assert s["caption"] == captions.caption(torch.from_numpy(unpng(s["labels"]).astype(np.int64)))
    assert "a cloudy sky" in s["caption"]
    r = client.post("/sessions", json={"model": "scene-sd-img2img", "image": s["image"], "prompt": s["caption"],
                                       "steps": 10, "guidance": 3.0})  # fmt: skip
    assert r.status_code == 201, r.text
    sid = r.json()["session"]
    r = client.post(f"/sessions/{sid}/edits", json={"prompt": s["caption"].replace("a cloudy sky", "a clear sky")})
    assert r.status_code == 200 and r.json()["edit"] == 1, r.text
    assert 0 < r.json()["stats"]["region_fraction"] < 1
    r = client.post("/sessions", json={"model": "scene-sd", "prompt": "the sea below mountains, a clear sky",
                                       "steps": 10, "guidance": "high"})  # fmt: skip
    assert r.status_code == 422 and "guidance" in r.json()["error"]
    r = client.post("/sessions", json={"model": "scene-sd", "prompt": "the sea below mountains, a clear sky",
                                       "steps": 10})  # fmt: skip
    assert r.status_code == 201, r.text


def test_a_pipeline_directory_is_served_as_its_registered_adapter_says():
    """The server asks the pipeline adapters' registry what a pipeline class takes, instead of keeping a table."""
    from sparsedit.serve.models import pipeline_kind

    assert pipeline_kind("DDIMPipeline") == ("ddpm", ("image",))
    assert pipeline_kind("StableDiffusionInpaintPipeline") == ("sd-inpaint", ("image", "mask", "prompt"))
    assert pipeline_kind("StableDiffusionXLPipeline") == ("sdxl-txt2img", ("prompt",))
    assert pipeline_kind("FluxPipeline") == ("flux-txt2img", ("prompt",))
    for refused in ("StableDiffusionControlNetImg2ImgPipeline", "QwenImagePipeline", ""):
        with pytest.raises(ValueError, match="the server takes .*StableDiffusionImg2ImgPipeline"):
            pipeline_kind(refused)


def _png_bytes(img) -> bytes:

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_pngs_of_every_mode_decode_to_their_colours_and_ids():
    """Issue 37's inputs read wrong: a palette PNG was read as its indices, a 16-bit PNG kept its low byte, a
    grey+alpha PNG reached the model with two channels."""
    import numpy as np
    from PIL import Image

    from sparsedit.serve.models import ImageTooLarge, png_to_array

    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :3] = (200, 30, 10)
    rgb[:, 3:] = (0, 90, 250)
    palette = Image.fromarray(rgb).quantize(colors=2)  # a palette ("P") image of the same colours
    assert np.array_equal(png_to_array(_png_bytes(palette), "image"), rgb)
    assert set(np.unique(png_to_array(_png_bytes(palette), "labels", "ids"))) <= {0, 1}  # the indices are the ids
    grey16 = Image.fromarray(np.arange(24, dtype=np.uint16).reshape(4, 6) * 2800)  # mode "I;16"
    got = png_to_array(_png_bytes(grey16), "image")
    assert got.shape == (4, 6, 3) and got[0, 1, 0] == round(2800 * 255 / 65535) and got[-1, -1, 0] == 251
    la = Image.fromarray(np.stack([np.full((4, 6), 100, np.uint8), np.full((4, 6), 0, np.uint8)], -1))  # "LA"
    assert np.array_equal(png_to_array(_png_bytes(la), "image"), np.full((4, 6, 3), 255))  # transparent: white
    rgba = Image.fromarray(np.concatenate([rgb, np.full((4, 6, 1), 255, np.uint8)], -1))  # "RGBA"
    assert np.array_equal(png_to_array(_png_bytes(rgba), "image"), rgb)
    big = Image.new("L", (3000, 3000))  # 9 MP of zeros: a few KiB of PNG
    with pytest.raises(ImageTooLarge, match="3000x3000 = 9000000 pixels, over this server's limit of 1048576"):
        png_to_array(_png_bytes(big), "image", max_pixels=1024 * 1024)


def test_bad_capture_values_and_sizes_are_4xx_not_500(tmp_path):
    import base64

    import numpy as np

    from sparsedit.serve import ModelRegistry, create_app

    def b64(a):
        from PIL import Image

        return base64.b64encode(_png_bytes(Image.fromarray(a))).decode()

    img = np.zeros((64, 64, 3), np.uint8)
    with TestClient(create_app(ModelRegistry(), reproducible=True)) as c:
        for body, status, match in [
            ({"image": b64(img[:1, :1])}, 422, "multiples of 8"),
            ({"image": b64(np.zeros((60, 100, 3), np.uint8))}, 422, "100x60 pixels"),
            ({"image": b64(img), "steps": 0}, 422, "steps must be a whole number of at least 1"),
            ({"image": b64(img), "steps": 2.5}, 422, "steps must be a whole number"),
            ({"image": b64(img), "seed": -1}, 422, "seed must be a whole number"),
            ({"image": b64(np.zeros((2048, 1024, 3), np.uint8))}, 413, "over this server's limit"),
        ]:
            r = c.post("/sessions", json={"model": "scene-ddpm", **body})
            assert r.status_code == status and match in r.json()["error"], (body.keys(), r.status_code, r.text)


def test_request_bodies_over_the_limit_are_refused_before_they_are_read():
    from sparsedit.serve import ModelRegistry, create_app
    from sparsedit.serve.app import default_max_body

    assert default_max_body(1024 * 1024) > 4 * 1024 * 1024  # a base64 PNG of 1 MP stored uncompressed fits
    with TestClient(create_app(ModelRegistry(), max_body=1000)) as c:
        r = c.post("/sessions", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["error"]

        def chunks():  # no Content-Length: counted as it streams in
            for _ in range(10):
                yield b" " * 500

        r = c.post("/sessions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["error"]
        assert c.post("/sessions", json={"model": "nope"}).status_code == 404  # a small body goes through


def test_a_loopback_server_answers_only_loopback_host_names():
    """Against DNS rebinding: a page of another site resolving its name to 127.0.0.1 sends its own Host."""
    from sparsedit.serve import LOOPBACK_NAMES, ModelRegistry, create_app, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example.org")
    app = create_app(ModelRegistry(), allowed_hosts=LOOPBACK_NAMES)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/health").status_code == 200
    with TestClient(app, base_url="http://localhost") as c:
        assert c.get("/health").status_code == 200
    with TestClient(app, base_url="http://rebound.example") as c:
        assert c.get("/health").status_code == 400


def test_serving_beyond_loopback_needs_a_token_or_insecure():
    from typer.testing import CliRunner

    from sparsedit.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "1"], env={"SPARSEDIT_TOKEN": ""})
    assert result.exit_code == 2 and "--token" in result.output and "--insecure" in result.output


def test_a_token_is_checked_on_every_route_and_the_page_keeps_it_in_a_cookie(registry):
    app = create_app(registry, token="s3cret")
    with TestClient(app) as c:
        for method, path in [("GET", "/health"), ("GET", "/"), ("GET", "/models"), ("POST", "/sessions"),
                             ("GET", "/sessions/x"), ("DELETE", "/sessions/x")]:  # fmt: skip
            r = c.request(method, path)
            assert r.status_code == 401 and "token" in r.json()["error"], (method, path)
        assert c.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/models?token=s3cret").status_code == 401  # only the page takes it in the URL
        page = c.get("/?token=s3cret")
        assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
        assert c.get("/models").status_code == 200  # the page's own requests: the cookie


def test_concurrent_creates_under_a_memory_budget_all_get_their_ids(registry, scene):
    """Issue 37's race: six creates under a budget gave five 500s, because a create read its session's editor after a
    parallel request had parked it, and the sessions held their slots for good. Bounded: 6 requests, 4 threads."""
    from concurrent.futures import ThreadPoolExecutor

    image, _ = scene
    with TestClient(create_app(registry, memory_budget=1, workers=2, max_sessions=6, reproducible=True)) as c:
        body = {"model": "scene-ddpm", "image": b64png(image), **FAST}
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: c.post("/sessions", json=body), range(6)))
        assert [r.status_code for r in responses] == [201] * 6, [r.text[:100] for r in responses]
        ids = {r.json()["session"] for r in responses}
        assert len(ids) == 6 and all(r.json()["stats"]["macs_dense"] > 0 for r in responses)
        for sid in ids:
            assert c.delete(f"/sessions/{sid}").status_code == 204


def test_limits_are_named_in_their_refusals(registry, scene):
    """Issue 37's bounds: steps over --max-steps (422), more sessions than --max-sessions-per-client (429), and a
    session whose cache the library predicts would not fit --memory-budget (413, before anything runs)."""
    image, _ = scene
    with TestClient(create_app(registry, reproducible=True, max_steps=20, max_per_client=1)) as c:
        r = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), "steps": 21})
        assert r.status_code == 422 and "--max-steps" in r.json()["error"]
        first = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST})
        assert first.status_code == 201
        r = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST})
        assert r.status_code == 429 and "--max-sessions-per-client" in r.json()["error"]
        assert c.delete(f"/sessions/{first.json()['session']}").status_code == 204
        assert c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).status_code == 201
    with TestClient(create_app(registry, reproducible=True, session_limit=1 << 16)) as c:
        r = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST})
        assert r.status_code == 413 and "--memory-budget" in r.json()["error"]
        assert c.get("/health").status_code == 200


def test_progress_is_reported_step_by_step_and_forgotten_after(registry, scene):
    """A request that names a progress token is polled at GET /progress/{token} while it runs: every denoising step
    of the capture and of the edit is reported (steps done of steps), and the token is gone once it ends."""
    from sparsedit.serve.app import LocalBackend, create_app
    from sparsedit.serve.sessions import SessionManager

    seen = []

    class Recording(LocalBackend):
        def _watch(self, token, phase):
            report, done = super()._watch(token, phase)
            if report is None:
                return report, done

            def record(step, steps):
                report(step, steps)
                seen.append((phase, self.progress_of(token)))

            return record, done

    image, _ = scene
    backend = Recording(SessionManager(registry, reproducible=True))
    app = create_app(registry, backend=backend)
    with TestClient(app) as c:
        r = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST, "progress": "cap-1"})
        assert r.status_code == 201, r.text
        sid = r.json()["session"]
        r = c.post(f"/sessions/{sid}/edits", json={"image": b64png(stroke(image, 8, 8)), "progress": "edit_1"})
        assert r.status_code == 200, r.text
        r = c.post(f"/sessions/{sid}/undo?progress=undo-1")
        assert r.status_code == 200, r.text
        assert c.get("/progress/cap-1").status_code == 404  # forgotten once its request ended
        bad = c.post(f"/sessions/{sid}/edits", json={"image": b64png(image), "progress": "no spaces/or slashes"})
        assert bad.status_code == 422 and "progress" in bad.json()["error"]
    for phase in ("capture", "edit", "undo"):
        steps = [p for ph, p in seen if ph == phase]
        n = steps[0]["steps"]
        assert [p["step"] for p in steps] == list(range(1, n + 1)) and all(p["steps"] == n for p in steps), steps
    assert [p["steps"] for ph, p in seen if ph == "capture"][0] == FAST["steps"] * FAST["strength"]


def test_a_capture_predicted_over_the_time_limit_is_refused_before_it_runs(registry, scene):
    """--max-request-seconds: the model's cost is measured once (calls recorded, MACs counted on the meta device at
    any size), a capture predicted over the limit is a 422 naming it, and the prediction grows with the pixels and
    steps as the MACs do (attention's quadratic share included)."""
    from sparsedit.serve.models import SessionEditor

    image, _ = scene
    model = registry.get("scene-ddpm")
    cost = model.cost()
    assert cost is model.cost() and cost.seconds_per_mac > 0  # measured once
    small, big, longer = cost.predict(64, 64, 5), cost.predict(128, 128, 5), cost.predict(64, 64, 10)
    assert 4.0 < big / small < 6.0 and longer == pytest.approx(2 * small)  # 4x the pixels, 16x the attention
    # The counted MACs are the engine's own count of a dense capture at another size.
    editor = SessionEditor(model, {**model.defaults, "steps": 10, "strength": 0.5, "seed": 0})
    editor.capture({"image": np.asarray(Image.fromarray(image).resize((96, 96)))})
    engine = editor.editor.last_stats["macs_dense"]
    editor.close()
    assert cost._macs((96, 96), 5) == pytest.approx(engine, rel=0.05)
    with TestClient(create_app(registry, max_request_seconds=small * 2)) as c:
        ok = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST})
        assert ok.status_code == 201, ok.text
        big_image = np.asarray(Image.fromarray(image).resize((128, 128)))
        r = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(big_image), **FAST})
        assert r.status_code == 422 and "--max-request-seconds" in r.json()["error"], r.text


def test_an_sd3_directory_saved_without_t5_is_served(tmp_path):
    """`sparsedit serve --model DIR` of a Stable Diffusion 3 pipeline saved with `text_encoder_3=None` (scene-dit's
    export, and SD3 used without T5): the absent components are passed as None when it loads."""
    from pathlib import Path

    from sparsedit.testing import tiny_sd3

    tiny_sd3(tmp_path / "tok", pipeline="img2img").save_pretrained(str(tmp_path / "sd3"))
    model = ModelRegistry().add_dir(Path(tmp_path / "sd3"))
    assert (model.kind, model.takes) == ("sd3-img2img", ("image", "prompt"))
    assert type(model.base()).__name__ == "StableDiffusion3Img2ImgPipeline" and model.base().text_encoder_3 is None


def test_measure_dense_times_one_plain_call_per_model_and_input_and_changes_no_result(registry, scene):
    """`--measure-dense`: after a model's first capture at an input size and options, the server times one plain
    call (the pipeline; SDEdit as plain DDPM calls; the generator), once, and the responses of every session on it
    carry it as `dense_seconds`, the page's reference for an edit's speed-up. The sessions' results are the same bits
    as on a server that does not measure, which answers `dense_seconds: null`."""
    image, labels = scene
    fresh = ModelRegistry()  # its models have measured nothing yet
    with TestClient(create_app(fresh, reproducible=True, measure_dense=True)) as c:
        a = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).json()
        assert a["stats"]["dense_seconds"] > 0
        measured = dict(fresh.get("scene-ddpm").dense_seconds)
        assert len(measured) == 1
        b = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(stroke(image, 8, 8)), **FAST}).json()
        assert fresh.get("scene-ddpm").dense_seconds == measured  # the same size and options: not measured again
        assert b["stats"]["dense_seconds"] == a["stats"]["dense_seconds"]
        e = c.post(f"/sessions/{a['session']}/edits", json={"image": b64png(stroke(image, 40, 8))}).json()
        assert e["stats"]["dense_seconds"] == a["stats"]["dense_seconds"]
        other = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), "steps": 8,
                                          "strength": 0.5, "seed": 0}).json()  # fmt: skip
        assert len(fresh.get("scene-ddpm").dense_seconds) == 2 and other["stats"]["dense_seconds"] > 0
        g = c.post("/sessions", json={"model": "scene-spade", "labels": b64png(labels)}).json()
        assert g["stats"]["dense_seconds"] > 0
    with TestClient(create_app(registry, reproducible=True)) as c:
        a2 = c.post("/sessions", json={"model": "scene-ddpm", "image": b64png(image), **FAST}).json()
        e2 = c.post(f"/sessions/{a2['session']}/edits", json={"image": b64png(stroke(image, 40, 8))}).json()
        assert a2["stats"]["dense_seconds"] is None and e2["stats"]["dense_seconds"] is None
    assert a["image"] == a2["image"] and e["image"] == e2["image"]
