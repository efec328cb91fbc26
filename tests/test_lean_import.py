import subprocess
import sys


def test_import_needs_no_diffusers_or_gpu():
    code = (
        "import sys, sparsedit; "
        "heavy = [m for m in ('diffusers', 'transformers', 'triton', 'fastapi', 'uvicorn', 'ray') if m in sys.modules]; "
        "assert not heavy, heavy; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": ""}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
