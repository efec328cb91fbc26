import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from sparsedit.cli import app
from sparsedit.demo import run_demo


def test_info_lists_versions_and_backends():
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "reference" in result.output
    assert "StableDiffusionXLImg2ImgPipeline" in result.output and "DDPMPipeline" in result.output
    out = subprocess.run([sys.executable, "-m", "sparsedit", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "backends" in out.stdout


def test_demo_writes_report(tmp_path):
    report = run_demo(tmp_path, size=48, repeats=1, sd_size=128, gan_size=(64, 128), gan_ngf=8, scene_size=64)
    assert (tmp_path / "report.html").read_text().count("<img") == 3 + 7 * 4 + 2 * 2
    names = [r["name"].split(" ")[0] for r in report["runs"]]
    assert names == ["SDEdit", "GauGAN", "Stable", "Prompt", "GauGAN", "UNet", "BatchNorm"]
    assert "trained scene-ddpm" in report["runs"][0]["name"] and "trained scene-spade" in report["runs"][1]["name"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert "trained" in json.dumps(saved["weights"])
    for row in report["runs"]:
        # Sparse work, unless the run-level cost model measured sparse slower than dense on this machine (tiny
        # models at these test sizes) and ran it densely, saying so.
        assert row["macs_sparse"] < row["macs_dense"] or row["dense_fallback"]
        assert row["dense_seconds"] > 0 and row["sparse_seconds"] > 0
    exact = next(r for r in report["runs"] if "exact" in r["name"])
    assert exact["max_abs_error"] < 1e-4


def test_edit_command_writes_the_result(tmp_path):
    import numpy as np
    from PIL import Image

    from sparsedit.data import scenes

    labels = scenes.sample(1, 64, seed=1)["labels"][0].numpy().astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    labels[10:20, 30:44] = scenes.TREES
    Image.fromarray(labels).save(tmp_path / "edited.png")
    out = tmp_path / "out.png"
    args = ["edit", "--model", "scene-spade", "--image", str(tmp_path / "labels.png"), "--edited",
            str(tmp_path / "edited.png"), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fewer MACs" in result.output and Image.open(out).size == (64, 64)


def test_edit_command_takes_a_prompt_edit_on_scene_sd(tmp_path):
    import numpy as np
    from PIL import Image

    from sparsedit.data import captions, scenes

    s = scenes.sample(1, 64, seed=1_000_004)
    Image.fromarray(((s["image"][0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(tmp_path / "in.png")
    prompt = captions.caption(s["labels"][0])
    out = tmp_path / "out.png"
    args = ["edit", "--model", "scene-sd-img2img", "--image", str(tmp_path / "in.png"), "--prompt", prompt,
            "--new-prompt", prompt.replace("a cloudy sky", "a clear sky"), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recomputed" in result.output and Image.open(out).size == (64, 64)
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "in.png")))


def test_serve_command_prints_its_url_and_serves(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SPARSEDIT_STATE_DIR": str(tmp_path / "state")}  # the default state dir, moved here
    proc = subprocess.Popen([sys.executable, "-m", "sparsedit", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line and str(tmp_path / "state") in line
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
            except OSError:
                time.sleep(0.2)
        assert body and body["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_edit_command_user_errors_are_one_line_before_any_computing(tmp_path):
    import numpy as np
    from PIL import Image

    from sparsedit.data import scenes

    labels = scenes.sample(1, 64, seed=1)["labels"][0].numpy().astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    (tmp_path / "not-an-image.png").write_text("hello")
    base = ["edit", "--model", "scene-spade", "--image", str(tmp_path / "labels.png")]
    cases = [
        (["--out", str(tmp_path / "missing-dir" / "out.png")], "--out"),
        (["--out", str(tmp_path)], "--out"),
        (["--out", str(tmp_path / "o.png"), "--edited", str(tmp_path / "nope.png")], "--edited"),
        (["--out", str(tmp_path / "o.png"), "--edited", str(tmp_path / "not-an-image.png")], "not an image"),
    ]
    for extra, match in cases:
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and match in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = CliRunner().invoke(app, ["edit", "--model", "no-such-model", "--image", str(tmp_path / "labels.png"),
                                      "--out", str(tmp_path / "o.png")])  # fmt: skip
    assert result.exit_code == 2 and "--model no-such-model" in result.output and "Traceback" not in result.output


def test_edit_command_with_nothing_changed_divides_by_nothing(tmp_path):
    import numpy as np
    from PIL import Image

    from sparsedit.data import scenes

    labels = scenes.sample(1, 64, seed=1)["labels"][0].numpy().astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    out = tmp_path / "out.png"
    args = ["edit", "--model", "scene-spade", "--image", str(tmp_path / "labels.png"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "nothing changed" in result.output and "fewer MACs" not in result.output
