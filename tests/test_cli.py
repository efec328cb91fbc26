import json
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
