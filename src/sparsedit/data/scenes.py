"""Procedural landscape scenes with their label maps: training data and test inputs that need no download.

Every scene is drawn from a seed into a resolution-free description (horizon, ridges, shoreline, trees, rocks,
colours, noise lattices) and then rendered at the requested size, so one seed gives the same scene at 32 or 512
pixels. `sample(n, size, seed)` renders scenes `seed`-th batch, indices `0..n-1`; scene `i` depends only on
`(seed, i)`, so a bigger `n` extends a batch without changing its first images.

Classes, in painting order (later ones cover earlier ones):

    0 sky · 1 clouds · 2 mountains · 3 snow · 4 water · 5 sand · 6 grass · 7 trees · 8 rocks
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


CLASSES = ("sky", "clouds", "mountains", "snow", "water", "sand", "grass", "trees", "rocks")
SKY, CLOUDS, MOUNTAINS, SNOW, WATER, SAND, GRASS, TREES, ROCKS = range(len(CLASSES))
NUM_CLASSES = len(CLASSES)

# Colours of the classes for label-map pictures (uint8 RGB).
PALETTE = torch.tensor(
    [
        [110, 170, 235],  # sky
        [235, 235, 245],  # clouds
        [120, 100, 90],  # mountains
        [255, 255, 255],  # snow
        [30, 80, 190],  # water
        [230, 200, 130],  # sand
        [90, 180, 60],  # grass
        [20, 90, 30],  # trees
        [140, 140, 140],  # rocks
    ],
    dtype=torch.uint8,
)

_LAYOUTS = ("sea", "lake", "meadow", "desert", "alpine")


def sample(n: int, size: int | tuple[int, int] = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """`n` scenes: `{"image": float [n, 3, H, W] in [-1, 1], "labels": long [n, H, W]}` (class ids, see `CLASSES`).

    Args:
        n: number of scenes.
        size: `H` (square) or `(H, W)`; any resolution, 8 pixels or more.
        seed: which batch of scenes; scene `i` depends only on `(seed, i)`.
    """
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if n < 0 or h < 8 or w < 8:
        raise ValueError(f"need n >= 0 and a size of at least 8x8 pixels, got n={n}, size={size}.")
    images = torch.empty(n, 3, h, w)
    labels = torch.empty(n, h, w, dtype=torch.long)
    for i in range(n):
        images[i], labels[i] = render(describe(seed, i), (h, w))
    return {"image": images, "labels": labels}


def to_rgb(labels: torch.Tensor) -> torch.Tensor:
    """Label map(s) `[..., H, W]` → uint8 colour pictures `[..., H, W, 3]` with `PALETTE`."""
    return PALETTE[labels.clamp(0, NUM_CLASSES - 1)]


# -- the scene description -----------------------------------------------------------------------------------------
def describe(seed: int, index: int) -> dict:
    """The resolution-free description of scene `(seed, index)`: a dict of scalars and small noise lattices."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))

    def u(lo=0.0, hi=1.0):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def lattice(*shape):
        return torch.rand(*shape, generator=g)

    layout = _LAYOUTS[int(torch.randint(len(_LAYOUTS), (), generator=g))]
    dusk = u() < 0.25
    scene = {
        "layout": layout,
        "horizon": u(0.38, 0.62),
        "sky_top": _jitter(g, (0.35, 0.30, 0.55) if dusk else (0.15, 0.35, 0.80), 0.08),
        "sky_low": _jitter(g, (0.95, 0.60, 0.40) if dusk else (0.65, 0.82, 0.97), 0.06),
        "cloud_cover": u(0.0, 0.55),
        "cloud_noise": [lattice(4 * 2**o, 8 * 2**o) for o in range(4)],
        "cloud_tint": _jitter(g, (0.97, 0.85, 0.80) if dusk else (0.96, 0.96, 0.98), 0.03),
        "ridges": [],
        "ground_noise": [lattice(4 * 2**o, 4 * 2**o) for o in range(4)],
        "grass": _jitter(g, (0.30, 0.58, 0.20), 0.07),
        "sand": _jitter(g, (0.88, 0.78, 0.52), 0.05),
        "water": _jitter(g, (0.10, 0.32, 0.62), 0.06),
        "rock": _jitter(g, (0.50, 0.49, 0.47), 0.06),
        "tree": _jitter(g, (0.08, 0.32, 0.12), 0.04),
        "ripples": lattice(64, 6),
    }
    n_ridges = {"alpine": 2, "desert": 1}.get(layout, int(torch.randint(0, 3, (), generator=g)))
    for k in range(n_ridges):
        near = k == n_ridges - 1
        scene["ridges"].append(
            {
                "height": u(0.20, 0.40) if layout == "alpine" else u(0.10, 0.30),
                "profile": [lattice(3 * 2**o + 1) for o in range(4)],
                "colour": _jitter(g, (0.42, 0.38, 0.36) if near else (0.48, 0.52, 0.62), 0.06),
                "snowline": u(0.35, 0.75) if layout == "alpine" or u() < 0.3 else 2.0,
                "haze": 0.15 if near else 0.45,
            }
        )
    # The ground: where water and sand lie below the horizon.
    if layout == "sea":
        scene["shore"] = u(0.15, 0.45)  # fraction of the ground (top to bottom) that is water
        scene["beach"] = u(0.06, 0.18)
    elif layout == "lake":
        scene["lake"] = (u(0.25, 0.75), u(0.25, 0.55), u(0.15, 0.35), u(0.08, 0.2))  # cx, cy, rx, ry (in ground)
    scene["shore_profile"] = [lattice(4 * 2**o + 1) for o in range(3)]
    # Trees and rocks: positions in the ground's own coordinates (0 at the horizon, 1 at the bottom).
    n_trees = {"desert": 0, "sea": int(u(0, 6)), "alpine": int(u(0, 14))}.get(layout, int(u(3, 22)))
    scene["trees"] = [
        (u(), u(0.05, 1.0), u(0.6, 1.4), u() < (0.7 if layout == "alpine" else 0.35), u(-0.04, 0.04))
        for _ in range(n_trees)
    ]
    n_rocks = int(u(2, 9)) if layout in ("desert", "alpine") else int(u(0, 4))
    scene["rocks"] = [(u(), u(0.05, 1.0), u(0.6, 1.6)) for _ in range(n_rocks)]
    return scene


def _jitter(g: torch.Generator, rgb, amount: float) -> torch.Tensor:
    return (torch.tensor(rgb) + amount * (2 * torch.rand(3, generator=g) - 1)).clamp(0, 1)


# -- rendering -----------------------------------------------------------------------------------------------------
def _field(octaves: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
    """Fractal noise in about [0, 1]: lattices upsampled (bicubic) to `h × w` and summed with halving weights."""
    total, weight = torch.zeros(h, w), 0.0
    for o, lat in enumerate(octaves):
        a = 0.5**o
        total += a * F.interpolate(lat[None, None], size=(h, w), mode="bicubic", align_corners=True)[0, 0]
        weight += a
    return total / weight


def _curve(octaves: list[torch.Tensor], w: int, ridged: bool = False) -> torch.Tensor:
    """1-D fractal noise over the width in [0, 1]; `ridged` folds it into sharp peaks."""
    total, weight = torch.zeros(w), 0.0
    for o, lat in enumerate(octaves):
        a = 0.55**o
        v = F.interpolate(lat[None, None], size=w, mode="linear", align_corners=True)[0, 0]
        total += a * ((1 - (2 * v - 1).abs()) if ridged else v)
        weight += a
    return total / weight


def _paint(img, lab, mask, colour, cls):
    img[:] = torch.where(mask, colour, img)
    lab[mask[0]] = cls


def render(scene: dict, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a `describe`d scene: `(image [3, H, W] in [-1, 1], labels [H, W])`."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    yy, xx = ys[:, None].expand(h, w), xs[None, :].expand(h, w)
    hz = scene["horizon"]
    img = torch.zeros(3, h, w)
    lab = torch.full((h, w), SKY, dtype=torch.long)

    # Sky: a vertical gradient, lighter towards the horizon.
    t = (yy / hz).clamp(0, 1) ** 1.5
    img[:] = scene["sky_top"][:, None, None] * (1 - t) + scene["sky_low"][:, None, None] * t

    # Clouds: thresholded fractal noise, squashed towards the horizon, shaded darker at the bottom.
    if scene["cloud_cover"] > 0.02:
        f = _field(scene["cloud_noise"], h, w)
        thresh = 0.62 - 0.25 * scene["cloud_cover"]
        density = ((f - thresh) / 0.08).clamp(0, 1) * (yy < hz * 0.9)
        shade = 0.80 + 0.20 * ((f - thresh) / 0.2).clamp(0, 1)
        colour = scene["cloud_tint"][:, None, None] * shade
        img[:] = img * (1 - density) + colour * density
        lab[density > 0.5] = CLOUDS

    # Mountains: ridged 1-D noise profiles standing on the horizon; slopes lit from the left, hazed with distance.
    for ridge in scene["ridges"]:
        prof = _curve(ridge["profile"], w, ridged=True)
        top = hz - ridge["height"] * (0.25 + 0.75 * prof)  # [w]
        mask = yy >= top[None, :]
        slope = torch.diff(prof, prepend=prof[:1]) * w / 40
        k = max(1, w // 32) * 2 + 1  # smooth the lighting so that it follows faces, not single columns
        slope = F.avg_pool1d(slope[None, None], k, 1, k // 2, count_include_pad=False)[0, 0]
        light = (0.85 - 2.5 * slope).clamp(0.55, 1.15)[None, :]
        tex = 0.9 + 0.2 * _field(scene["ground_noise"][1:], h, w)
        depth = ((yy - top[None, :]) / max(ridge["height"], 1e-3)).clamp(0, 1)
        colour = ridge["colour"][:, None, None] * light * tex * (1 - 0.25 * depth)
        colour = colour * (1 - ridge["haze"]) + scene["sky_low"][:, None, None] * ridge["haze"]
        _paint(img, lab, mask[None], colour, MOUNTAINS)
        # Snow above the snowline (a fraction of the ridge's height, measured from the horizon).
        snowline = hz - ridge["height"] * ridge["snowline"]
        snow = mask & (yy < snowline + 0.02 * (prof[None, :] - 0.5))
        if snow.any():
            white = torch.tensor([0.93, 0.94, 0.97])[:, None, None] * light
            _paint(img, lab, snow[None], white, SNOW)

    # The ground, below the horizon: g runs 0 → 1 from the horizon to the bottom.
    ground = yy >= hz
    g = ((yy - hz) / (1 - hz)).clamp(0, 1)
    gtex = _field(scene["ground_noise"], h, w)
    layout = scene["layout"]
    base_cls, base = (SAND, scene["sand"]) if layout == "desert" else (GRASS, scene["grass"])
    if layout == "alpine":
        base = base * 0.85
    shade = (0.75 + 0.45 * g) * (0.85 + 0.3 * gtex)  # brighter in front, mottled
    colour = base[:, None, None] * shade
    colour = colour * (1 - 0.35 * (1 - g)) + scene["sky_low"][:, None, None] * 0.35 * (1 - g)  # distance haze
    _paint(img, lab, ground[None], colour, base_cls)

    wobble = _curve(scene["shore_profile"], w) - 0.5
    water = torch.zeros(h, w, dtype=torch.bool)
    if layout == "sea":
        shore = scene["shore"] + 0.08 * wobble[None, :]
        water = ground & (g < shore)
        beach = ground & ~water & (g < shore + scene["beach"] * (1 + g))
        sand = scene["sand"][:, None, None] * (0.85 + 0.3 * gtex)
        _paint(img, lab, beach[None], sand, SAND)
    elif layout == "lake":
        cx, cy, rx, ry = scene["lake"]
        rx_ = rx * (1 + 0.5 * wobble[None, :])
        water = ground & (((xx - cx) / rx_) ** 2 + ((g - cy) / ry) ** 2 <= 1)
        rim = ground & ~water & (((xx - cx) / (rx_ + 0.03)) ** 2 + ((g - cy) / (ry + 0.04)) ** 2 <= 1)
        _paint(img, lab, rim[None], scene["sand"][:, None, None] * (0.8 + 0.3 * gtex), SAND)
    if water.any():
        rip = F.interpolate(scene["ripples"][None, None], size=(h, w), mode="bicubic", align_corners=True)[0, 0]
        reflect = scene["sky_low"] * 0.5 + scene["water"] * 0.5
        depth = g.clamp(0, 1)
        colour = reflect[:, None, None] * (1 - depth) + scene["water"][:, None, None] * depth
        colour = colour * (0.9 + 0.2 * rip)
        _paint(img, lab, water[None], colour, WATER)

    # Rocks and trees, far to near so that nearer ones cover farther ones; sizes grow towards the viewer.
    objects = [("rock", *r) for r in scene["rocks"]] + [("tree", *t) for t in scene["trees"]]
    objects.sort(key=lambda o: o[2])
    for kind, ox, og, scale, *rest in objects:
        y0 = hz + og * (1 - hz)
        persp = 0.35 + 0.9 * og
        if water[min(h - 1, int(y0 * h)), min(w - 1, int(ox * w))]:
            continue  # nothing stands in the water
        if kind == "rock":
            rx, ry = 0.045 * scale * persp, 0.028 * scale * persp
            d = ((xx - ox) / rx) ** 2 + ((yy - (y0 - ry * 0.6)) / ry) ** 2
            mask = d <= 1
            lit = (0.95 - 0.35 * ((xx - ox) / rx + (yy - y0 + ry) / ry) / 2).clamp(0.5, 1.2)
            colour = scene["rock"][:, None, None] * lit * (0.9 + 0.2 * gtex)
            _paint(img, lab, mask[None], colour, ROCKS)
        else:
            conifer, lean = rest
            height = 0.16 * scale * persp
            width = 0.05 * scale * persp
            if conifer:  # a triangle on a short trunk
                top = y0 - height
                rel = ((yy - top) / height).clamp(0, 1)
                mask = (yy >= top) & (yy <= y0 - 0.12 * height) & ((xx - ox - lean * (1 - rel)).abs() <= width * rel)
                lit = 1.0 - 0.45 * ((xx - ox) / width).clamp(-1, 1)
            else:  # a round crown
                cy = y0 - 0.6 * height
                d2 = ((xx - ox - lean) / (width * 1.4)) ** 2 + ((yy - cy) / (0.45 * height)) ** 2
                mask = d2 <= 1
                lit = 1.1 - 0.35 * ((xx - ox - lean) / (width * 1.4) + (yy - cy) / (0.45 * height))
            trunk = ((xx - ox).abs() <= width * 0.12) & (yy <= y0) & (yy >= y0 - 0.25 * height) & ~mask
            _paint(img, lab, trunk[None], torch.tensor([0.30, 0.22, 0.15])[:, None, None], TREES)
            colour = scene["tree"][:, None, None] * lit.clamp(0.5, 1.4) * (0.85 + 0.3 * gtex)
            _paint(img, lab, mask[None], colour, TREES)

    return (img.clamp(0, 1) * 2 - 1), lab


def grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """Tile `[n, 3, H, W]` images in [-1, 1] (or uint8 `[n, H, W, 3]`) into one uint8 picture `[H', W', 3]`."""
    if images.dtype != torch.uint8:
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    n, h, w, _ = images.shape
    rows = math.ceil(n / nrow)
    out = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    return out
