"""The compiled CPU backend: `kernels.cpp` built with the system compiler against the installed torch.

`make setup` builds it (`sparsedit build-ops`; about 10 s). The library's name carries a digest of the source, the
compiler flags and torch's version, so a changed kernel or a different torch never loads a stale build: it is
simply not there, and the backend says so (`sparsedit info`) while the reference backend runs. Nothing is compiled
during an edit.

What it takes: float32 tensors on the CPU, channels-last feature maps (the cache keeps them so), the activations in
`ACTIVATION_CODES` and every padding mode. Anything else (another dtype or activation, an odd layout) goes to the
reference backend inside the same call, so choosing this backend never changes what a call accepts.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from ... import fingerprints, regions
from ..dispatch import Backend, backend_enabled, register_backend
from ..reference import PADDING_MODES, ReferenceBackend


__all__ = [
    "ACTIVATION_CODES",
    "CompiledCPUBackend",
    "available",
    "build",
    "build_dir",
    "library_path",
    "load",
    "pool_bytes",
    "release_pool",
]

SOURCE = Path(__file__).with_name("kernels.cpp")

# The activations the kernels compute (the rest run in the reference backend); the codes match `kernels.cpp`.
ACTIVATION_CODES = {
    "identity": 0,
    "relu": 1,
    "silu": 2,
    "leaky_relu": 3,
    "prelu": 4,
    "gelu": 5,
    "gelu_tanh": 6,
    "tanh": 7,
    "sigmoid": 8,
}
_PAD_CODES = {mode: i for i, mode in enumerate(PADDING_MODES)}

# ATen's vector code is selected by CPU_CAPABILITY; build for the one torch itself dispatches to on this machine.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _ISA_FLAGS else "DEFAULT"


def _flags() -> list[str]:
    cap = _capability()
    flags = [
        "-O3",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-fopenmp",
        # The prologue multiplies, then adds, as the reference's two ops do: no fused multiply-add behind our back.
        "-ffp-contract=off",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    if cap != "DEFAULT":
        flags += [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", *_ISA_FLAGS[cap]]
    return flags


def build_dir() -> Path:
    """Where builds go: `$SPARSEDIT_OPS_DIR`, else `~/.cache/sparsedit/ops`."""
    env = os.environ.get("SPARSEDIT_OPS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sparsedit" / "ops"


def _digest() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(_flags()).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    """The shared library this source, torch and CPU build to (it may not exist yet)."""
    return build_dir() / f"sparsedit_cpu_{_capability().lower()}_{_digest()}.so"


def build(force: bool = False, verbose: bool = False) -> tuple[Path, float]:
    """Compile `kernels.cpp` (unless this exact build exists) and return its path and the seconds it took (0 when it
    was already built). Raises `RuntimeError` with the compiler's output if it fails."""
    from torch.utils.cpp_extension import include_paths, library_paths

    path = library_path()
    if path.exists() and not force:
        return path, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    libs = library_paths()
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)  # written aside, then renamed: never half a library
    os.close(fd)
    cmd = [
        os.environ.get("CXX", "g++"),
        *_flags(),
        *(f"-I{p}" for p in include_paths()),
        str(SOURCE),
        "-o",
        tmp,
        *(f"-L{p}" for p in libs),
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{libs[0]}",
    ]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        os.unlink(tmp)
        raise RuntimeError(f"no C++ compiler ({cmd[0]}): install g++ or set CXX") from e
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building {SOURCE.name} failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    if verbose:
        print(f"built {path} in {seconds:.1f} s")
    return path, seconds


_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def load() -> str | None:
    """Load the built library once; None when it is loaded, else why it cannot be."""
    with _LOCK:
        if "why" not in _STATE:
            _STATE["why"] = _load()
        return _STATE["why"]  # type: ignore[return-value]


def _load() -> str | None:
    if os.environ.get("SPARSEDIT_NO_COMPILED", "") not in ("", "0"):
        return "turned off by SPARSEDIT_NO_COMPILED"
    path = library_path()
    if not path.exists():
        return f"not built for this source, torch and CPU ({path.name}): run `sparsedit build-ops` (`make setup` does)"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return f"{path.name} does not load ({e}): rebuild with `sparsedit build-ops --force`"
    return None


def available() -> bool:
    """Whether the compiled kernels can run in this process (built, loaded, not turned off)."""
    return backend_enabled(CompiledCPUBackend.name) and load() is None


def pool_bytes() -> int:
    """Bytes held by the kernels' pool of large output buffers (see `kernels.cpp`; `SPARSEDIT_OPS_POOL_MB` caps it,
    default 1024, 0 turns it off); 0 without a build."""
    return torch.ops.sparsedit_cpu.pool_bytes(torch.empty(0), False) if load() is None else 0


def release_pool() -> None:
    """Let go of the pool's buffers (those still in use are freed with their tensors)."""
    if load() is None:
        torch.ops.sparsedit_cpu.pool_bytes(torch.empty(0), True)


def _checksum_sums(words: list) -> torch.Tensor | None:
    """`fingerprints.tensor_checksums`' word sums of many tensors in one compiled pass (`checksums` in
    kernels.cpp), or `None` where the kernel cannot run: then fingerprints' torch reductions, the same bits."""
    if any(w.device.type != "cpu" for w in words) or not available():
        return None
    return torch.ops.sparsedit_cpu.checksums(words)


fingerprints.SUMS_KERNEL = _checksum_sums


def _differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """`regions.difference_mask(a, b, eps=0)` in one compiled pass (`differs` in kernels.cpp), or `None` where it
    cannot run (then the XOR and reductions in regions.py, the same mask)."""
    if (
        a.device.type != "cpu"
        or b.device.type != "cpu"
        or a.dim() != 4
        or a.stride() != b.stride()
        or a.element_size() not in (1, 2, 4, 8)
        or not (a.is_contiguous() or a.is_contiguous(memory_format=_CL))
        or not available()
    ):
        return None
    return torch.ops.sparsedit_cpu.differs(a, b)


regions.DIFF_KERNEL = _differs

_REFERENCE = ReferenceBackend()
_CL = torch.channels_last


def _float32(*tensors) -> bool:
    """Every given tensor (`None`s skipped) is float32: what the kernels compute."""
    return all(t is None or t.dtype == torch.float32 for t in tensors)


def _contiguous(t) -> bool:
    return t is None or t.is_contiguous()


@register_backend
class CompiledCPUBackend(Backend):
    """`gather` with its prologue and `scatter` with its residual, each one pass over the tiles in C++."""

    name = "cpu-compiled"
    priority = 10
    devices = ("cpu",)
    dtypes = (torch.float32,)

    def unavailable_reason(self) -> str | None:
        return load()

    def gather(self, x, origins, th, tw, scale, shift, activation, slope, poison, params, weight, padding_mode):
        code = ACTIVATION_CODES.get(activation)
        n = origins.shape[0]
        if code is None or n == 0 or not _float32(x):
            return _REFERENCE.gather(
                x, origins, th, tw, scale, shift, activation, slope, poison, params, weight, padding_mode
            )
        c = x.shape[1]
        if activation == "prelu":
            if weight is None:
                code = ACTIVATION_CODES["leaky_relu"]
            else:
                weight = weight.to(torch.float32).expand(c).contiguous()
        else:
            weight = None
        if scale is not None:
            scale = scale.to(torch.float32).contiguous()
        if shift is not None:
            shift = shift.to(torch.float32).contiguous()
        # Every tile pixel is written (zero padding included), so a poisoned result equals this one.
        tiles = torch.ops.sparsedit_cpu.gather(
            x.contiguous(memory_format=_CL), origins.contiguous(), th, tw, scale, shift, code, float(slope), weight,
            _PAD_CODES[padding_mode],
        )  # fmt: skip
        return tiles.permute(0, 3, 1, 2)

    def scatter(self, out, tiles, origins, residual):
        if (
            not _float32(out, tiles)
            or tiles.shape[0] == 0
            or tiles.stride(1) != 1
            or not out.is_contiguous(memory_format=_CL)
            or (residual is not None and not residual.is_contiguous(memory_format=_CL))
        ):
            return _REFERENCE.scatter(out, tiles, origins, residual)
        torch.ops.sparsedit_cpu.scatter(out, tiles, origins.contiguous(), residual)

    def scatter_tokens(self, out, tokens, index, residual):
        if not _float32(out, tokens, residual) or not tokens.is_contiguous() or not _contiguous(residual):
            return _REFERENCE.scatter_tokens(out, tokens, index, residual)
        torch.ops.sparsedit_cpu.scatter_tokens(out, tokens, index.contiguous(), residual)

    def write_pixels(self, rows, tiles, at, lin, residual, keep_old):
        if not _float32(rows, tiles, residual) or not rows.is_contiguous() or not _contiguous(residual):
            return _REFERENCE.write_pixels(rows, tiles, at, lin, residual, keep_old)
        if tiles.stride(1) != 1 and tiles.shape[1] > 1:  # (one channel: any layout reads the same)
            tiles = tiles.contiguous(memory_format=_CL)  # the copy the reference's row view makes too
        old = torch.ops.sparsedit_cpu.write_pixels(rows, tiles, at.contiguous(), lin.contiguous(), residual, keep_old)
        return old if keep_old else None
