"""GauGAN (SPADE, Park et al., CVPR 2019): the generator, with the official checkpoint's key names, and its sparse
handlers.

The modules mirror NVlabs/SPADE's `SPADEGenerator` (no VAE), `SPADEResnetBlock` and `SPADE`, so a state dict saved by
that project loads with `load_state_dict` (spectral norm is folded into the weights on load, as its eval-mode forward
computes it). Weights: the SPADE project's pretrained checkpoints (`latest_net_G.pth` of `cityscapes`, `ade20k`,
`coco`), which users download themselves and load from a local path with `SPADEGenerator.from_checkpoint`.

Sparse execution: `SPADE` and `SPADEResnetBlock` have fused handlers. A SPADE layer's modulation (gamma, beta) is
computed sparsely from the label map's changed region, the parameter-free norm folds into the gather of the input
tiles, and the block's shortcut add is fused into `conv_1`'s scatter. With eval-mode BatchNorm every operation is
local, so `SparseConfig(exact=True)` reproduces the dense output to float tolerance.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import SparseConfig
from ..nn.base import Prologue, SparseHandler, handler_of, register_handler
from ..nn.blocks import Add, _no_store
from ..nn.state import LayerRecord, Mode
from ..nn.tracking import tracked_call, untracked
from ..regions import Geometry
from .labels import encode_labels


__all__ = ["SPADE", "SPADEGenerator", "SPADEResnetBlock", "fold_spectral_norm"]

_POINT = Geometry()
_LEAKY = Prologue(activation="leaky_relu", slope=0.2)
_RELU = Prologue(activation="relu")
_UPSAMPLINGS = {"normal": 5, "more": 6, "most": 7}


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: `norm(x) * (1 + gamma(seg)) + beta(seg)`.

    Args:
        norm_nc: channels of `x`.
        label_nc: channels of the label map (one-hot classes, plus the instance-edge channel if any).
        hidden: channels of the shared embedding (128 in GauGAN).
        kernel_size: kernel of the label-map convolutions.
        param_free_norm: `"batch"` (eval-mode BatchNorm without affine; exact under sparse editing) or `"instance"`
            (InstanceNorm; its statistics span the map, so sparse editing freezes them: approximate).
    """

    def __init__(
        self, norm_nc: int, label_nc: int, hidden: int = 128, kernel_size: int = 3, param_free_norm: str = "batch"
    ):
        super().__init__()
        if param_free_norm in ("batch", "syncbatch"):
            self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        elif param_free_norm == "instance":
            self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        else:
            raise ValueError(f"param_free_norm must be 'batch', 'syncbatch' or 'instance', got {param_free_norm!r}.")
        pad = kernel_size // 2
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size, padding=pad), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size, padding=pad)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        if segmap.shape[-2:] != x.shape[-2:]:
            segmap = F.interpolate(segmap, size=x.shape[-2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """GauGAN's residual block: SPADE → LeakyReLU(0.2) → 3×3 conv, twice, plus a (SPADE → 1×1 conv) shortcut when
    the channel count changes."""

    def __init__(self, fin: int, fout: int, label_nc: int, **spade_kwargs):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = nn.Conv2d(fin, fmiddle, 3, padding=1)
        self.conv_1 = nn.Conv2d(fmiddle, fout, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)
        self.norm_0 = SPADE(fin, label_nc, **spade_kwargs)
        self.norm_1 = SPADE(fmiddle, label_nc, **spade_kwargs)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, **spade_kwargs)
        self.actvn = nn.LeakyReLU(0.2)
        self.add = Add()

    def shortcut(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        return self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.shortcut(x, seg)
        dx = self.conv_0(self.actvn(self.norm_0(x, seg)))
        dx = self.conv_1(self.actvn(self.norm_1(dx, seg)))
        return self.add(x_s, dx)


def fold_spectral_norm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace spectral-norm parameters (`weight_orig`, `weight_u`, `weight_v`, as `torch.nn.utils.spectral_norm`
    saves them, or the `parametrizations.weight.original` form) by the plain weight they give in eval mode:
    `weight_orig / (u · (W v))`, computed as torch does."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("weight_u", "weight_v")) or ".parametrizations.weight.0._" in key:
            continue  # the power-iteration vectors, consumed below
        if key.endswith("weight_orig"):
            base = key[: -len("weight_orig")]
            u, v = state_dict[base + "weight_u"], state_dict[base + "weight_v"]
            out[base + "weight"] = _divide_by_sigma(value, u, v)
        elif key.endswith(".parametrizations.weight.original"):
            base = key[: -len("parametrizations.weight.original")]
            prefix = base + "parametrizations.weight.0."
            out[base + "weight"] = _divide_by_sigma(value, state_dict[prefix + "_u"], state_dict[prefix + "_v"])
        else:
            out[key] = value
    return out


def _divide_by_sigma(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sigma = torch.dot(u, torch.mv(weight.reshape(weight.shape[0], -1), v))
    return weight / sigma


class SPADEGenerator(nn.Module):
    """GauGAN's generator (the SPADE project's `SPADEGenerator` without VAE): label map → image in [-1, 1].

    Args:
        label_nc: number of classes.
        size: `(H, W)` of the label maps and images; each must be divisible by `2 ** upsamplings`.
        ngf: base channel count (64 in GauGAN).
        num_upsampling_layers: `"normal"` (5 upsamplings), `"more"` (6) or `"most"` (7, with an extra block).
        use_instance: the label map carries an instance-edge channel (`semantic_nc = label_nc + 1`).
        contain_dontcare_label: an extra "don't care" class (`label_nc + 1` one-hot channels), as SPADE's option.
        hidden, kernel_size, param_free_norm: of every SPADE layer (see `SPADE`).

    `forward` takes integer class ids `[B, H, W]` (encoded here; pass `instance=` for the edge channel) or the
    encoded one-hot `[B, semantic_nc, H, W]` tensor.
    """

    def __init__(
        self,
        label_nc: int,
        size: tuple[int, int] = (256, 512),
        ngf: int = 64,
        num_upsampling_layers: str = "more",
        use_instance: bool = True,
        contain_dontcare_label: bool = False,
        hidden: int = 128,
        kernel_size: int = 3,
        param_free_norm: str = "batch",
    ):
        super().__init__()
        if num_upsampling_layers not in _UPSAMPLINGS:
            raise ValueError(
                f"num_upsampling_layers must be one of {sorted(_UPSAMPLINGS)}, got {num_upsampling_layers!r}."
            )
        n = _UPSAMPLINGS[num_upsampling_layers]
        h, w = size
        if h % 2**n or w % 2**n:
            raise ValueError(
                f"size {size} is not divisible by 2**{n} (num_upsampling_layers={num_upsampling_layers!r})."
            )
        self.config = {
            "label_nc": label_nc,
            "size": (h, w),
            "ngf": ngf,
            "num_upsampling_layers": num_upsampling_layers,
            "use_instance": use_instance,
            "contain_dontcare_label": contain_dontcare_label,
            "hidden": hidden,
            "kernel_size": kernel_size,
            "param_free_norm": param_free_norm,
        }
        self.size = (h, w)
        self.num_classes = label_nc + int(contain_dontcare_label)
        self.use_instance = use_instance
        self.semantic_nc = self.num_classes + int(use_instance)
        self.num_upsampling_layers = num_upsampling_layers
        self.sh, self.sw = h // 2**n, w // 2**n
        nf, sem = ngf, self.semantic_nc
        kw = {"hidden": hidden, "kernel_size": kernel_size, "param_free_norm": param_free_norm}
        self.fc = nn.Conv2d(sem, 16 * nf, 3, padding=1)
        self.head_0 = SPADEResnetBlock(16 * nf, 16 * nf, sem, **kw)
        self.G_middle_0 = SPADEResnetBlock(16 * nf, 16 * nf, sem, **kw)
        self.G_middle_1 = SPADEResnetBlock(16 * nf, 16 * nf, sem, **kw)
        self.up_0 = SPADEResnetBlock(16 * nf, 8 * nf, sem, **kw)
        self.up_1 = SPADEResnetBlock(8 * nf, 4 * nf, sem, **kw)
        self.up_2 = SPADEResnetBlock(4 * nf, 2 * nf, sem, **kw)
        self.up_3 = SPADEResnetBlock(2 * nf, nf, sem, **kw)
        final_nc = nf
        if num_upsampling_layers == "most":
            self.up_4 = SPADEResnetBlock(nf, nf // 2, sem, **kw)
            final_nc = nf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.act = nn.LeakyReLU(0.2)
        self.tanh = nn.Tanh()

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def cityscapes(cls, use_instance: bool = True, **overrides) -> SPADEGenerator:
        """GauGAN's Cityscapes configuration: 35 classes (+ the instance-edge channel), 256×512, ngf 64, `"more"`
        upsampling layers (a 4×8 start), spectral-norm convolutions folded on load."""
        config = {"label_nc": 35, "size": (256, 512), "ngf": 64, "num_upsampling_layers": "more"}
        return cls(use_instance=use_instance, **{**config, **overrides})

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: str | dict = "cityscapes", map_location="cpu"
    ) -> SPADEGenerator:
        """Load a SPADE-project generator checkpoint (`latest_net_G.pth`, or a `.safetensors` file with the same
        keys) from a local path. `config` is `"cityscapes"` or the constructor's keyword arguments."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"no checkpoint at {path}; download the SPADE project's weights and pass the path."
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device=str(map_location))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
        model = cls.cityscapes() if config == "cityscapes" else cls(**config)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:2]
            label_nc = _label_channels(state)
            hint = f" The checkpoint's label maps have {label_nc} channels." if label_nc else ""
            raise ValueError(
                f"{path} does not fit the {'Cityscapes' if config == 'cityscapes' else 'given'} configuration "
                f"({'; '.join(shapes) or str(e).splitlines()[0]}).{hint} Pass the generator's configuration: "
                "`SPADEGenerator.from_checkpoint(path, config={'label_nc': ..., 'size': (H, W), 'ngf': ..., "
                "'num_upsampling_layers': ..., 'use_instance': ...})` with the options it was trained with."
            ) from None
        return model.eval()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict with this module's (= the SPADE project's) key names. Spectral-norm parameters are
        folded into plain weights, a `module.` prefix (DataParallel) is dropped, and missing BatchNorm
        `num_batches_tracked` counters (older checkpoints) are filled in."""
        state = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
        state = fold_spectral_norm(state)
        if "fc.weight" in state and state["fc.weight"].dim() == 2:
            raise ValueError(
                "this checkpoint was trained with the VAE encoder (`fc` is a Linear layer, --use_vae); only the "
                "deterministic, label-map-conditioned generator is supported."
            )
        own = self.state_dict()
        for key in own:
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = own[key]
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- forward --------------------------------------------------------------------------------------------------
    def encode(self, labels: torch.Tensor, instance: torch.Tensor | None = None) -> torch.Tensor:
        """Integer class ids `[B, H, W]` (and optional instance ids) → the one-hot input `[B, semantic_nc, H, W]`."""
        dtype = self.fc.weight.dtype
        return encode_labels(labels, self.num_classes, self.size, instance, self.use_instance, dtype)

    def forward(self, seg: torch.Tensor, instance: torch.Tensor | None = None) -> torch.Tensor:
        if not seg.is_floating_point() or instance is not None:
            seg = self.encode(seg, instance)
        elif seg.dim() != 4 or seg.shape[1] != self.semantic_nc or tuple(seg.shape[-2:]) != self.size:
            seg = self.encode(seg)  # raises the descriptive error
        # Channels-last, like the engine's cached maps: sparse gathers then read pixel rows without a full copy of
        # the label map per SPADE layer (the layout does not change any value).
        seg = seg.contiguous(memory_format=torch.channels_last)
        pyramid = {}

        def at(x):
            size = tuple(x.shape[-2:])
            if size == tuple(seg.shape[-2:]):
                return seg
            if size not in pyramid:
                pyramid[size] = F.interpolate(seg, size=size, mode="nearest")
            return pyramid[size]

        x = self.fc(F.interpolate(seg, size=(self.sh, self.sw), mode="nearest"))
        x = self.head_0(x, at(x))
        x = self.up(x)
        x = self.G_middle_0(x, at(x))
        if self.num_upsampling_layers in ("more", "most"):
            x = self.up(x)
        x = self.G_middle_1(x, at(x))
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = self.up(x)
            x = block(x, at(x))
        if self.num_upsampling_layers == "most":
            x = self.up(x)
            x = self.up_4(x, at(x))
        return self.tanh(self.conv_img(self.act(x)))

    def default_sparse_config(self) -> SparseConfig:
        """Exact with eval-mode BatchNorm; InstanceNorm SPADE layers need frozen statistics (approximate)."""
        exact = all(not isinstance(m, nn.InstanceNorm2d) for m in self.modules())
        return SparseConfig(exact=exact) if exact else SparseConfig(exact=False, dilation=1, input_dilation=1)


# -- sparse handlers ------------------------------------------------------------------------------------------------
@register_handler(SPADE)
class SPADEHandler(SparseHandler):
    """Fused SPADE: gamma and beta computed sparsely on the label map's reach, the parameter-free norm folded into the
    gather of `x`'s tiles, and `norm(x) * (1 + gamma) + beta` written only on the union of the changed regions."""

    kind = "spade"

    def prepare(self):
        m = self.module
        self.norm = handler_of(m.param_free_norm)
        self.shared = handler_of(m.mlp_shared[0])
        self.gamma = handler_of(m.mlp_gamma)
        self.beta = handler_of(m.mlp_beta)
        self.relu = handler_of(m.mlp_shared[1])
        parts = (self.norm, self.shared, self.gamma, self.beta, self.relu)
        self.fused = all(h is not None for h in parts) and self.norm.pointwise

    def macs_per_position(self, out):
        return 2 * out.shape[1]

    def forward(self, x, segmap):
        st = self.state
        if st.mode is Mode.SPARSE and self.fused:
            return self.sparse(x, segmap)
        if st.mode is Mode.CAPTURE and self.fused:
            return self._capture(x, segmap)
        return self.original(x, segmap)

    def _capture(self, x, segmap):
        m, st = self.module, self.state
        with _no_store(st):  # folded into the gather: only its statistics (if any) are kept
            normalized = m.param_free_norm(x)
        if segmap.shape[-2:] != x.shape[-2:]:
            segmap = F.interpolate(segmap, size=x.shape[-2:], mode="nearest")
        hidden = m.mlp_shared[0](segmap)
        with _no_store(st):
            actv = m.mlp_shared[1](hidden)
        out = normalized * (1 + m.mlp_gamma(actv)) + m.mlp_beta(actv)
        self.capture(st.key(self.name), out)
        macs = self.macs_dense(out)
        st.record(LayerRecord(self.name, self.kind, tuple(out.shape[-2:]), macs, macs, 1.0))
        return out

    def sparse(self, x, segmap):
        with untracked():  # every map's region is set by the handlers; the label map's resize is tagged here
            return self._sparse(x, segmap)

    def _sparse(self, x, segmap):
        st = self.state
        key = st.key(self.name)
        buf = self.buffer(key)
        if segmap.shape[-2:] != x.shape[-2:]:
            segmap = tracked_call(st, F.interpolate, segmap, size=x.shape[-2:], mode="nearest")
        hidden = self.shared.sparse(segmap)
        st.key(self.relu.name)  # the ReLU (folded into the gathers below) takes its call index, as in the capture
        gamma = self.gamma.sparse(hidden, _RELU)
        beta = self.beta.sparse(hidden, _RELU)
        norm = self.norm.prologue(x, st.key(self.norm.name))
        region = st.union(st.region_of(x), st.region_of(gamma), st.region_of(beta))
        poison = st.config.poison_scratch

        def compute(x_, bi, p):  # every gather is a fresh tensor: the arithmetic runs in place (the same bits)
            g = ops.gather(gamma, bi.origins, bi.tile, poison=poison).add_(1)
            b = ops.gather(beta, bi.origins, bi.tile, poison=poison)
            return p.gather(x_, bi.origins, bi.tile, poison).mul_(g).add_(b)

        def compute_dense(x_, p):
            return p.apply_dense(x_) * (1 + gamma) + beta

        out = self.run_tiles(x, region, _POINT, compute, compute_dense, buf, None, norm)
        st.set_region(out, region)
        return out


@register_handler(SPADEResnetBlock)
class SPADEResnetBlockHandler(SparseHandler):
    """Fused SPADE residual block: LeakyReLU folded into each conv's gather, the shortcut add fused into `conv_1`'s
    scatter, which writes straight into the block's output buffer."""

    kind = "spade_block"

    def prepare(self):
        m = self.module
        names = ["norm_0", "conv_0", "norm_1", "conv_1", "add", "actvn"]
        names += ["norm_s", "conv_s"] if m.learned_shortcut else []
        self.parts = {n: handler_of(getattr(m, n)) for n in names}
        self.fused = all(h is not None for h in self.parts.values()) and all(
            self.parts[n].fused for n in names if n.startswith("norm")
        )

    def forward(self, x, seg):
        st = self.state
        if st.mode is Mode.SPARSE and self.fused:
            return self.sparse(x, seg)
        if st.mode is Mode.CAPTURE and self.fused:
            m = self.module
            x_s = m.shortcut(x, seg)
            n0 = m.norm_0(x, seg)
            with _no_store(st):  # the activations fold into the next conv's gather
                h = m.actvn(n0)
            n1 = m.norm_1(m.conv_0(h), seg)
            with _no_store(st):  # conv_1's output is never read: the fused add writes the block output directly
                dx = m.conv_1(m.actvn(n1))
            return m.add(x_s, dx)
        return self.original(x, seg)

    def sparse(self, x, seg):
        with untracked():  # its parts set their outputs' regions
            return self._sparse(x, seg)

    def _sparse(self, x, seg):
        st, p = self.state, self.parts
        actvn = p["actvn"].name
        x_s = p["conv_s"].sparse(p["norm_s"].sparse(x, seg)) if "conv_s" in p else x
        st.key(actvn)
        dx = p["conv_0"].sparse(p["norm_0"].sparse(x, seg), _LEAKY)
        st.key(actvn)
        out = p["add"].buffer(st.key(p["add"].name))
        return p["conv_1"].sparse(p["norm_1"].sparse(dx, seg), _LEAKY, residual=x_s, into=out)


def _label_channels(state: dict) -> int | None:
    """The label-map channels a SPADE checkpoint's first SPADE layer takes (label classes + instance edge)."""
    for k, v in state.items():
        if k.endswith("mlp_shared.0.weight") or k.endswith("mlp_shared.0.weight_orig"):
            return int(v.shape[1])
    return None
