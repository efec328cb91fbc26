"""One exact sparse convolution step (gather with the BatchNorm+ReLU prologue, pixel-tile GEMM, scatter) three ways:
the engine's eager path (the compiled C++ backend's gather and scatter around `F.linear`), the same step written in
plain torch and compiled by `torch.compile` (inductor: C++/OpenMP on CPU), and that plain-torch step eager.

    python benchmarks/compile_layer.py                      # 64 channels, 256 px map, 26x26 active pixels (1%)
    python benchmarks/compile_layer.py --channels 128 --side 40

Answers issue 39's question whether a `torch.compile`d step would beat the C++ kernels on a thin model's layer (the
BatchNorm trunk's shape); the compile time is printed apart. Outputs are compared with the eager path's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from profile_edit import cpu_name
from unet_edit import loadavg

from sparsedit import ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--side", type=int, default=26, help="the active pixels: a side x side square")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, h = args.channels, args.size
    x = torch.randn(1, c, h, h).contiguous(memory_format=torch.channels_last)
    out = torch.randn(1, c, h, h).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, c, 3, 3) / (3 * c**0.5), torch.randn(c)
    scale, shift = torch.rand(1, c) + 0.5, torch.randn(1, c)
    lo = (h - args.side) // 2
    ys, xs = torch.meshgrid(torch.arange(lo, lo + args.side), torch.arange(lo, lo + args.side), indexing="ij")
    pix = torch.stack([torch.zeros(ys.numel(), dtype=torch.long), ys.reshape(-1), xs.reshape(-1)], 1)
    origins = pix - torch.tensor([0, 1, 1])
    wm = w.permute(0, 2, 3, 1).reshape(c, -1)  # the gathered windows' (y, x, c) order
    lin = pix[:, 1] * h + pix[:, 2]

    def engine(out):
        tiles = ops.gather(x, origins, (3, 3), scale, shift, "relu")
        y = F.linear(tiles.permute(0, 2, 3, 1).reshape(tiles.shape[0], -1), wm, b)
        ops.scatter(out, y[:, :, None, None], pix)
        return out

    def plain(out):
        iy = (lin // h)[:, None, None] + torch.arange(-1, 2)[None, :, None]
        ix = (lin % h)[:, None, None] + torch.arange(-1, 2)[None, None, :]
        inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < h)
        t = x.permute(0, 2, 3, 1)[0][iy.clamp(0, h - 1), ix.clamp(0, h - 1)]
        t = F.relu(t * scale[0] + shift[0]) * inside[..., None]
        y = F.linear(t.reshape(t.shape[0], -1), wm, b)
        out.permute(0, 2, 3, 1).reshape(-1, c).index_copy_(0, lin, y)
        return out

    def bench(f):
        buf = out.clone()
        for _ in range(10):
            f(buf)
        ts = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            f(buf)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    with torch.no_grad():
        t0 = time.perf_counter()
        compiled = torch.compile(plain, dynamic=False)
        got = compiled(out.clone())
        compile_s = time.perf_counter() - t0
        ref = engine(out.clone())
        err = float((got - ref).abs().max())
        print(f"{cpu_name()}, threads {torch.get_num_threads()}, torch {torch.__version__}, load {loadavg()}")
        print(f"{c} channels, {h}x{h} map, {pix.shape[0]} active pixels ({100 * pix.shape[0] / h / h:.2f}%); "
              f"compile {compile_s:.1f} s; max |compiled - engine| {err:.2e}")  # fmt: skip
        for _ in range(3):  # interleaved rounds
            print(f"engine {bench(engine):.3f} ms | torch.compile {bench(compiled):.3f} ms | plain torch "
                  f"{bench(plain):.3f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
