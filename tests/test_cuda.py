"""The sparse engine on a CUDA device (issue 39): the same exactness as on CPU, and the calibration's clocks read
after the device finished. Marked `cuda`; skipped where torch sees no GPU (the project's CI), run by
`pytest -m cuda` on a machine with one."""

import pytest
import torch
import torch.nn as nn

import sparsedit
from sparsedit import GANEditor, SparseConfig
from sparsedit.models import SPADEGenerator
from sparsedit.testing import UserResnetGenerator, UserSRNet, paint_labels, randomize_batchnorm, street_scene

from .nn.test_local_layers import check_exact


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(autouse=True)
def no_tf32():
    """Float tolerance needs float32 arithmetic: TF32 convolutions (cuDNN's default) round inputs to 10 bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _bn_resnet():
    model = UserResnetGenerator(16, 2, norm=nn.BatchNorm2d).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("build", [lambda: UserSRNet(16, 3), _bn_resnet], ids=["sr-net", "bn-resnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exact_edits_on_cuda_equal_dense_and_keep_the_rest(build, dtype):
    torch.manual_seed(0)
    model = build().to("cuda", dtype)
    x = torch.randn(1, 3, 48, 48, device="cuda", dtype=dtype)
    region = torch.zeros(1, 48, 48, dtype=torch.bool, device="cuda")
    region[0, 10:16, 20:29] = True
    check_exact(model, x, region, tile=4)


def test_gauggan_label_edit_on_cuda_is_exact():
    torch.manual_seed(0)
    model = randomize_batchnorm(SPADEGenerator.cityscapes(ngf=16, size=(64, 128))).cuda()
    labels, instance = street_scene(64, 128)
    new, inst = paint_labels(labels, instance, 0.02)
    editor = GANEditor(model, SparseConfig(exact=True, measured_fallback=False))
    with torch.no_grad():
        editor.capture(labels.cuda(), instance.cuda())
        out = editor.edit(new.cuda(), inst.cuda(), commit=False)
        dense = model(new.cuda(), inst.cuda())
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
    assert editor.last_stats["macs_sparse"] < editor.last_stats["macs_dense"]


@pytest.mark.timing
def test_the_calibration_on_cuda_times_finished_kernels():
    torch.manual_seed(0)
    model = UserSRNet(16, 3).cuda().eval()
    sparsedit.sparsify_(model, SparseConfig())
    try:
        with torch.no_grad(), sparsedit.capturing(model):
            model(torch.randn(1, 3, 64, 64, device="cuda"))
        cal = sparsedit.calibration_of(model)
    finally:
        sparsedit.unsparsify_(model)
    assert cal is not None and cal.dense_seconds > 0
