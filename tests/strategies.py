"""Hypothesis strategies shared by the tests: random regions and random layer stacks."""

import torch
import torch.nn as nn
from hypothesis import strategies as st


REGION_KINDS = ("empty", "pixel", "border", "corner", "blobs", "all")


@st.composite
def regions(draw, b: int, h: int, w: int):
    """A `[B, H, W]` bool region of one of the interesting kinds."""
    kind = draw(st.sampled_from(REGION_KINDS))
    r = torch.zeros(b, h, w, dtype=torch.bool)
    if kind == "pixel":
        r[draw(st.integers(0, b - 1)), draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    elif kind == "border":
        side = draw(st.sampled_from("tblr"))
        depth = draw(st.integers(1, 2))
        if side == "t":
            r[:, :depth] = True
        elif side == "b":
            r[:, -depth:] = True
        elif side == "l":
            r[:, :, :depth] = True
        else:
            r[:, :, -depth:] = True
    elif kind == "corner":
        r[:, : draw(st.integers(1, 3)), -draw(st.integers(1, 3)) :] = True
    elif kind == "blobs":
        for _ in range(draw(st.integers(1, 3))):
            bi = draw(st.integers(0, b - 1))
            y, x = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            r[bi, y : y + draw(st.integers(1, 4)), x : x + draw(st.integers(1, 4))] = True
    elif kind == "all":
        r[:] = True
    return r


@st.composite
def conv_stacks(draw, in_channels: int):
    """A random (possibly nested) nn.Sequential of convs (k 1/3/5, stride 1/2, padding, dilation), transposed convs,
    explicit reflection/replication/zero pads, eval BatchNorm and InstanceNorm with running statistics, activations,
    pools and nearest upsampling."""
    layers = []
    c = in_channels
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "bn", "act", "up", "pool", "convT", "pad", "in"]))
        if kind == "conv":
            kh = draw(st.sampled_from([1, 3, 5]))
            kw = kh if draw(st.booleans()) else draw(st.sampled_from([1, 3, 5]))
            groups = draw(st.sampled_from([1, 1, c]))  # dense or depthwise
            out = groups * draw(st.integers(1, 6 // groups if groups <= 6 else 1))
            layers.append(
                nn.Conv2d(
                    c,
                    out,
                    (kh, kw),
                    stride=(draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2]))),
                    padding=(draw(st.integers(0, kh // 2 + 1)), draw(st.integers(0, kw // 2 + 1))),
                    dilation=draw(st.sampled_from([1, 1, 2])),
                    groups=groups,
                    bias=draw(st.booleans()),
                )
            )
            c = out
        elif kind == "bn":
            bn = nn.BatchNorm2d(c)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.normal_()
            layers.append(bn)
        elif kind == "act":
            layers.append(
                draw(
                    st.sampled_from(
                        [nn.ReLU(), nn.SiLU(), nn.Tanh(), nn.LeakyReLU(0.2), nn.GELU(), nn.ELU(0.5), nn.Hardswish()]
                        + [nn.Mish(), nn.PReLU(), nn.Softplus(2.0), nn.ReLU6(), nn.GELU(approximate="tanh")]
                    )
                )
            )
        elif kind == "convT":
            k = draw(st.sampled_from([2, 3, 4]))
            stride = draw(st.sampled_from([1, 2]))
            out = draw(st.integers(1, 5))
            layers.append(
                nn.ConvTranspose2d(
                    c,
                    out,
                    k,
                    stride=stride,
                    padding=draw(st.integers(0, k - 1)),
                    output_padding=draw(st.integers(0, stride - 1)),
                    bias=draw(st.booleans()),
                )
            )
            c = out
        elif kind == "pad":
            p = draw(st.integers(1, 2))
            layers.append(draw(st.sampled_from([nn.ReflectionPad2d(p), nn.ReplicationPad2d(p), nn.ZeroPad2d(p)])))
        elif kind == "in":  # InstanceNorm with running statistics: in eval mode a fixed affine, exact
            norm = nn.InstanceNorm2d(c, affine=True, track_running_stats=True)
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.data.normal_()
            layers.append(norm)
        elif kind == "up":
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        else:
            layers.append(draw(st.sampled_from([nn.AvgPool2d(2), nn.MaxPool2d(3, stride=2)])))
    if len(layers) > 2 and draw(st.booleans()):  # nest part of the stack
        cut = draw(st.integers(1, len(layers) - 1))
        layers = layers[:cut] + [nn.Sequential(*layers[cut:])]
    return nn.Sequential(*layers).eval()
