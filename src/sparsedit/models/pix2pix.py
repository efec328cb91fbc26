"""pix2pix (Isola et al., CVPR 2017): the U-Net and ResNet generators, with the official checkpoint's key names.

The modules mirror junyanz/pytorch-CycleGAN-and-pix2pix's `UnetGenerator` (`unet_128`, `unet_256`) and
`ResnetGenerator` (`resnet_6blocks`, `resnet_9blocks`), so its `latest_net_G.pth` files load with
`load_state_dict`. Users download those checkpoints themselves (the project's `scripts/download_pix2pix_model.sh`)
and load them from a local path with `Pix2PixGenerator.from_checkpoint`.

Sparse editing: with eval-mode BatchNorm (`norm="batch"`, the project's pix2pix default) every layer is a fixed local
operation, so `SparseConfig(exact=True)` is exact; the U-Net's innermost layers see the whole image, though, so an
exact edit of a U-Net recomputes most of its decoder. With InstanceNorm (`norm="instance"`, CycleGAN's default)
the statistics span the map: sparse runs freeze them from the capture, which is approximate.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..config import SparseConfig
from ..nn.blocks import Add, Concat
from .labels import encode_labels


__all__ = ["Pix2PixGenerator"]

_KINDS = {"unet_128": 7, "unet_256": 8, "resnet_6blocks": 6, "resnet_9blocks": 9}


def _norm_layer(norm: str):
    if norm == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {norm!r}.")


class UnetSkipConnectionBlock(nn.Module):
    """One level of the pix2pix U-Net: down (LeakyReLU, 4×4 stride-2 conv, norm), the inner levels, up (ReLU, 4×4
    stride-2 transposed conv, norm), concatenated with the level's input.

    The official block's first LeakyReLU acts in place, so the skip connection it concatenates carries the activated
    input; this block computes exactly that, without in-place operations.
    """

    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False, innermost=False,
                 norm="batch", use_dropout=False):  # fmt: skip
        super().__init__()
        self.outermost = outermost
        use_bias = norm == "instance"
        norm_layer = _norm_layer(norm)
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=use_bias)
        downrelu, uprelu = nn.LeakyReLU(0.2), nn.ReLU()
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            model = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, uprelu, upconv, norm_layer(outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, norm_layer(inner_nc), submodule, uprelu, upconv, norm_layer(outer_nc)]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)
        if not outermost:
            self.cat = Concat()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        layers = list(self.model)
        skip = layers[0](x)  # the official LeakyReLU(inplace=True) turns x itself into this
        h = skip
        for layer in layers[1:]:
            h = layer(h)
        return self.cat(skip, h)


class ResnetBlock(nn.Module):
    """pix2pix's residual block: reflection pad, 3×3 conv, norm, ReLU, (dropout,) pad, conv, norm; plus the input."""

    def __init__(self, dim: int, norm="batch", use_dropout=False):
        super().__init__()
        norm_layer, use_bias = _norm_layer(norm), norm == "instance"
        block = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias), norm_layer(dim), nn.ReLU()]
        if use_dropout:
            block.append(nn.Dropout(0.5))
        block += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias), norm_layer(dim)]
        self.conv_block = nn.Sequential(*block)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.conv_block(x))


class Pix2PixGenerator(nn.Module):
    """The pix2pix generator (`netG` of pytorch-CycleGAN-and-pix2pix): image (or label map) → image in [-1, 1].

    Args:
        kind: `"unet_256"`, `"unet_128"`, `"resnet_9blocks"` or `"resnet_6blocks"`.
        input_nc, output_nc: channels in and out.
        ngf: base channel count.
        norm: `"batch"` (pix2pix's default; exact under sparse editing in eval mode), `"instance"` (approximate)
            or `"none"`.
        use_dropout: dropout layers (identity in eval mode), as pix2pix trains with.
        num_classes: when set, `forward` and `GANEditor` also take integer class ids `[B, H, W]`, one-hot encoded
            into `input_nc == num_classes` channels.
    """

    def __init__(self, kind: str = "unet_256", input_nc: int = 3, output_nc: int = 3, ngf: int = 64,
                 norm: str = "batch", use_dropout: bool = True, num_classes: int | None = None):  # fmt: skip
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}.")
        if num_classes is not None and num_classes != input_nc:
            raise ValueError(f"num_classes={num_classes} needs input_nc={num_classes} (one channel per class).")
        _norm_layer(norm)
        self.config = {"kind": kind, "input_nc": input_nc, "output_nc": output_nc, "ngf": ngf, "norm": norm,
                       "use_dropout": use_dropout, "num_classes": num_classes}  # fmt: skip
        self.kind, self.input_nc, self.num_classes, self.norm = kind, input_nc, num_classes, norm
        n = _KINDS[kind]
        if kind.startswith("unet"):
            self.downsamplings = n
            block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, innermost=True, norm=norm)
            for _ in range(n - 5):
                block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, submodule=block, norm=norm, use_dropout=use_dropout)
            block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm=norm)
            block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm=norm)
            block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm=norm)
            self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=block,
                                                 outermost=True, norm=norm)  # fmt: skip
        else:
            self.downsamplings = 2
            norm_layer, use_bias = _norm_layer(norm), norm == "instance"
            model = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=use_bias), norm_layer(ngf), nn.ReLU()]
            for i in range(2):
                mult = 2**i
                model += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=use_bias),
                          norm_layer(ngf * mult * 2), nn.ReLU()]  # fmt: skip
            model += [ResnetBlock(ngf * 4, norm, use_dropout) for _ in range(n)]
            for i in range(2):
                mult = 2 ** (2 - i)
                model += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1,
                                             bias=use_bias), norm_layer(ngf * mult // 2), nn.ReLU()]  # fmt: skip
            model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
            self.model = nn.Sequential(*model)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location="cpu", **config) -> Pix2PixGenerator:
        """Load a pytorch-CycleGAN-and-pix2pix generator checkpoint (`latest_net_G.pth`) from a local path; `config`
        holds the constructor's arguments the checkpoint was trained with (`kind`, `norm`, ...)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}; download the pix2pix weights and pass the path.")
        model = cls(**config)
        model.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
        return model.eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict with the official key names (`model.model.1.model.1.weight`, ...). A `module.` prefix
        is dropped, and so are InstanceNorm running statistics that checkpoints from torch < 0.4 carry (the
        official project patches them out the same way)."""
        state = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
        own = self.state_dict()
        for key in list(state):
            if key not in own and re.search(r"\.(running_mean|running_var|num_batches_tracked)$", key):
                del state[key]
        for key in own:
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = own[key]
        return super().load_state_dict(state, strict=strict, assign=assign)

    def encode(self, labels: torch.Tensor, instance: torch.Tensor | None = None) -> torch.Tensor:
        """Integer class ids → one-hot input (when built with `num_classes`); float images pass through checked."""
        if instance is not None:
            raise ValueError("pix2pix generators take no instance map; leave `instance` out.")
        if labels.is_floating_point():
            if labels.dim() != 4 or labels.shape[1] != self.input_nc:
                raise ValueError(
                    f"the generator takes [B, {self.input_nc}, H, W] inputs, got shape {tuple(labels.shape)}."
                )
        elif self.num_classes is None:
            raise TypeError(
                f"this generator takes float images [B, {self.input_nc}, H, W]; integer label maps need a generator "
                "built with num_classes=..."
            )
        dtype = next(self.parameters()).dtype
        x = encode_labels(labels, self.num_classes, dtype=dtype) if not labels.is_floating_point() else labels
        return x.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or x.dim() != 4 or x.shape[1] != self.input_nc:
            x = self.encode(x)
        m = 2**self.downsamplings
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"{self.kind} needs height and width divisible by {m}, got {x.shape[-2]}x{x.shape[-1]}.")
        return self.model(x)

    def default_sparse_config(self) -> SparseConfig:
        """Exact with BatchNorm (or none); InstanceNorm statistics are frozen from the capture (approximate)."""
        if self.norm == "instance":
            return SparseConfig(exact=False, dilation=1, input_dilation=1)
        return SparseConfig(exact=True)
