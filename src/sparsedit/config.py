"""Configuration dataclasses shared by every layer of sparsedit.

Configs sit at the bottom of the import graph so that the engine (``sparsedit.nn``), the cache and the techniques can
all read them without importing one another. Each technique re-exports its own config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


CONFIG_VERSION = 1


class Option(str, Enum):
    """A choice among named values: an `Enum` that is also its string, so `"frozen"` and `NormStats.FROZEN` are
    interchangeable (comparisons, JSON, config files)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value, where: str):
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{where} must be one of {[m.value for m in cls]}, got {value!r}.") from None


class NormStats(Option):
    FROZEN = "frozen"
    RECOMPUTE = "recompute"


class AttentionMode(Option):
    SPARSE = "sparse"
    DENSE = "dense"


class DiTContext(Option):
    CACHE = "cache"
    RECOMPUTE = "recompute"


class DiTCache(Option):
    KV = "kv"
    HIDDEN = "hidden"


class RegionMethod(Option):
    LATENT_DIFF = "latent_diff"
    CROSS_ATTENTION = "cross_attention"
    NOISE_DIFF = "noise_diff"
    MASK = "mask"


class Injection(Option):
    REFINE = "refine"
    REPLACE = "replace"


class OnStale(Option):
    RAISE = "raise"
    RECAPTURE = "recapture"


_NORM_STATS = tuple(m.value for m in NormStats)
_ATTENTION = tuple(m.value for m in AttentionMode)
_CACHE_DTYPES = ("float32", "float16", "bfloat16", "int8")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(value: int | float | str | None, what: str = "cache_budget") -> int | None:
    """Bytes from an int or a string like `"3GiB"`, `"512 MiB"`, `"2.5GB"` (`None` stays `None`)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of bytes or a string like '3GiB', got {value!r}.")
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :]
        if unit not in _UNITS or not digits:
            raise ValueError(
                f"{what}={value!r}: write bytes as a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), "
                "e.g. '3GiB'."
            )
        try:
            n = float(digits) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"{what}={value!r}: {digits!r} is not a number.") from None
    else:
        raise TypeError(f"{what} must be a number of bytes or a string like '3GiB', got {type(value).__name__}.")
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}.")
    return int(n)


class _ConfigMixin:
    """dict/JSON round-trip with a version check, shared by every config dataclass."""

    version: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as sorted JSON. A sparse run's fingerprint asks for it before every forward, so the text is
        kept beside the config with a snapshot of its fields (a dict field copied), and made again only when a field
        changed since (about 0.2 ms a call otherwise)."""
        state = tuple(
            (k, dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items() if k != "_json_memo"
        )
        memo = self.__dict__.get("_json_memo")
        if memo is not None and memo[0] == state:
            return memo[1]
        text = json.dumps(self.to_dict(), sort_keys=True)
        self.__dict__["_json_memo"] = (state, text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        version = data.get("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ValueError(
                f"{cls.__name__} version {version} is newer than this sparsedit understands ({CONFIG_VERSION}); "
                "upgrade sparsedit to load it."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {unknown}; valid fields are {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass
class SparseConfig(_ConfigMixin):
    """How a model runs spatially sparse (SIGE, Li et al., NeurIPS 2022).

    Args:
        exact (`bool`, defaults to `False`):
            Propagate the edited region layer by layer through each layer's receptive reach and stride, so that the
            sparse output equals the dense output to float tolerance for networks of local operations with fixed
            normalisation. A layer whose output depends on the whole map (GroupNorm statistics) then makes the rest
            of the network dense. With `False`, SIGE's fixed per-resolution regions are used: faster, approximate.
        tile_size (`int` or `dict[int, int]`, *optional*):
            Output tile edge in pixels. A dict maps a feature-map height to a tile size (the key `0` is the fallback),
            so small maps can use small tiles. A tile of 1 computes a convolution as one GEMM over the active pixels'
            receptive fields (im2col of only those pixels: no halo waste). The default (`None`) picks by map height:
            1 for maps up to 32 px high with at least 256 channels (the deep stages of a UNet, where 8 px tiles
            cover most of the map and the weights are large enough for one GEMM to pay), 8 elsewhere. Measured
            (BENCHMARKS.md): SD 1.5 at 1.4% 2.9x with 8 everywhere, 4.2x with pixels at 16 and 8 px, 5.3x with
            pixels at 32 px too, at the same PSNR. Small, thin maps keep 8 px tiles: their larger recomputed area
            is what keeps approximate (frozen-statistics) edits close to dense.
        dilation (`int`, defaults to `1`):
            Approximate mode only: pixels of dilation added to the region at every resolution of the pyramid.
        input_dilation (`int`, defaults to `0`):
            Approximate mode only: dilation applied to the region at input resolution before the pyramid is built
            (SIGE uses 5 for diffusion models and 1 for GauGAN).
        pyramid_threshold (`float`, defaults to `0.3`):
            Approximate mode only: a downsampled mask pixel is active when its bilinear coverage exceeds this.
        dense_below (`int`, defaults to `0`):
            Approximate mode only: feature maps this many pixels high or smaller take the whole map as their region
            (when anything changed), so the coarse stages of a UNet, where one pixel spans much of the image, are
            recomputed in full instead of from stale context. `0`: every resolution uses its region.
        attention (`str`, defaults to `"sparse"`):
            Approximate mode only: self-attention over pixels. `"sparse"` (SIGE): only the region's pixels are
            queries, against every pixel's keys and values (the region's rows refreshed). `"dense"`: every pixel is
            a query again and the layer's whole output counts as changed, so the layers after it run on the whole
            map (closer to dense, slower). Exact mode always runs attention densely.
        norm_stats (`str`, defaults to `"frozen"`):
            GroupNorm statistics in sparse runs: `"frozen"` reuses the capture's statistics (SIGE, FISEdit);
            `"recompute"` updates them exactly from cached per-tile sums, paying only for the active region.
        dense_threshold (`float`, defaults to `0.6`):
            Cost model: a layer whose active tiles cover more than this fraction of its output runs densely, because
            tile overheads would make sparse slower than dense. `1.0` never falls back; `0.0` always runs dense.
        max_region_fraction (`float`, defaults to `0.4`):
            Cost model for a whole run: when the region (after `input_dilation`) covers more than this fraction of
            the input, the edit runs as one plain dense forward (committing edits refresh the cache instead), because
            per-layer overheads would make the sparse run slower than dense. Measured on DDPM-256 with the reference
            backend and fused ResNet blocks: 36% (after dilation) still ran 1.22x faster, 51% ran 0.98x.
        measured_fallback (`bool`, defaults to `True`):
            Never slower than dense, deterministically: when a capture ends, the model gets a calibration
            (`sparsedit.calibration`): one plain dense forward and sparse forwards at two probe regions, timed once
            per process, model, input shape, dtype, thread count and config, then reused by every edit, every fresh
            editor of that model and every saved session. An edit whose region reaches more of the input than the
            calibration's break-even runs as one plain dense forward; `last_stats` names the calibration in
            `dense_run`. The timing of the run in progress never decides, so the same call on the same state gives
            the same bits and a preview equals its commit. `False`: only `max_region_fraction` decides.
        check_region (`bool`, defaults to `True`):
            When editing with an explicit region, verify that the input equals the captured input outside it. A
            region that misses a change would otherwise silently return stale pixels.
        change_threshold (`float`, defaults to `12.0`):
            `SparseEditor`: how much an input must change to be an edit, in 8-bit pixel units (0-255), against
            re-encoding noise (a JPEG re-save, a float16 round trip). An area counts as changed where the mean
            difference over 8x8 pixels exceeds it in a channel, or a pixel's luminance moved by 4x it
            (`regions.change_mask`); elsewhere the edit keeps the current image's pixels and reports them in
            `last_stats["ignored_pixels"]`. Measured (tests/test_guards.py): JPEG re-saves at quality 75 and up of
            smooth pictures flag nothing; any stroke stronger than 12 over 8 pixels, or a thin line of 48 in
            luminance, is found. `0`: every bit counts.
        strict (`bool`, defaults to `True`):
            Raise when the model holds a layer the engine cannot make sparse. With `False` such layers run densely on
            every call (correct, but slower).
        cache_dtype (`str`, *optional*, defaults to `"auto"`):
            Store cached feature maps (and attention keys/values) in this dtype, e.g. `"bfloat16"` to halve a float32
            cache. Each run converts the entries it touches back to the compute dtype (one copy per entry per run),
            so values outside the region come back rounded. The model's input and normalisation statistics stay at
            full precision. `None`: the model's dtype. `"auto"`: `SparseEditor` stores its UNet's per-step cache in
            bfloat16 in approximate mode (measured: within 0.1 dB of a float32 cache, see BENCHMARKS.md) and keeps
            everything else, exact mode and the model-level API (`sparsify_`) in the model's dtype. `"int8"` (opt-in,
            approximate mode): feature maps and attention keys/values as int8 with one float32 scale per channel, a
            quarter of float32; the error it adds is reported in BENCHMARKS.md.
        cache_device (`str`, *optional*):
            Keep the cache on this device, e.g. `"cpu"` for a model on a GPU: a multi-step capture then lives in host
            memory and each sparse run copies in only the entries it touches (and writes them back when committed).
            `"disk"`: in memory-mapped temporary files, which the OS pages in when a run touches them.
        cache_budget (`int` or `str`, *optional*):
            The most bytes of memory the cache may hold, e.g. `"3GiB"`. `SparseEditor.capture` measures what the
            capture would hold (one dry step of each model, storing nothing) and fits it: bfloat16 storage first, then
            int8 (approximate mode), then the per-step UNet cache on disk; if nothing fits it raises `CacheBudgetError` before capturing, saying
            how much each option needs. The model-level API raises as soon as a capture would exceed it.
        prefetch (`bool`, *optional*):
            In a `SparseEditor` loop, copy the next step's cache entries into working form in the background while
            the current step computes (`sparsedit.prefetch`). `None` (default): on for a model on a GPU whose cache
            is kept elsewhere or in another dtype, off on CPU (there the copy competes with the computation for the
            same cores and memory bandwidth; measured in BENCHMARKS.md).
        dit_context (`str`, defaults to `"cache"`):
            Diffusion transformers with a joint text stream (SD3's MMDiT): under an image edit, `"cache"` keeps the
            context tokens' keys and values from the capture (the text stream does not see the edit, as inactive
            image tokens do not), so an edit of p of the image costs about p of a step; `"recompute"` runs the context
            tokens through every block again at every edit (they attend to the edited image), paying their share of
            the step each time (SD3 at 1024 px: 333 prompt tokens beside 4096 image tokens). See docs/engine.md.
        dit_cache (`str`, defaults to `"kv"`):
            Diffusion transformers: what the capture keeps per attention, step and guidance branch. `"kv"`: the keys
            and values of every token, read as they are. `"hidden"` (SD3's joint blocks): the attention's inputs (the
            normalised image and context tokens) instead, half the bytes of keys and values in the same dtype, and
            every sparse run projects all tokens' keys and values from them again: two projections of every token
            per attention, which caps a small edit's saving near 6x (SD3's blocks). The error is the same as
            keeping the keys and values in that dtype; the cost is measured in BENCHMARKS.md (`dit_fidelity.py`).
        dit_kv_share (`int`, defaults to `1`):
            Diffusion transformers: keep the keys and values of one denoising step for every `dit_kv_share`
            neighbouring steps (the first step of each group, by the scope's leading step index, as `SparseEditor`
            keys its steps), dividing their memory by about that factor. A step of the group reads its inactive
            tokens' keys and values from the group's first step (an approximation of a few steps' drift; the
            active tokens' are recomputed at every step, and the output tokens, so every latent outside the edit,
            stay each step's own, bit for bit). The error it adds is reported in BENCHMARKS.md (`dit_fidelity.py`).
        poison_scratch (`bool`, defaults to `False`):
            Debugging: fill scratch buffers with NaN before use, so any read of memory nothing wrote shows in the
            result.
        version (`int`): config schema version, for JSON round-trips.
    """

    exact: bool = False
    tile_size: int | dict[int, int] | None = None
    dilation: int = 1
    input_dilation: int = 0
    pyramid_threshold: float = 0.3
    dense_below: int = 0
    attention: AttentionMode | str = AttentionMode.SPARSE
    norm_stats: NormStats | str = NormStats.FROZEN
    dense_threshold: float = 0.6
    max_region_fraction: float = 0.4
    measured_fallback: bool = True
    check_region: bool = True
    change_threshold: float = 12.0
    strict: bool = True
    cache_dtype: str | None = "auto"
    cache_device: str | None = None
    cache_budget: int | str | None = None
    prefetch: bool | None = None
    dit_context: DiTContext | str = DiTContext.CACHE
    dit_cache: DiTCache | str = DiTCache.KV
    dit_kv_share: int = 1
    poison_scratch: bool = False
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self):
        if isinstance(self.tile_size, dict):
            # JSON turns int keys into strings; accept them back.
            self.tile_size = {int(k): int(v) for k, v in self.tile_size.items()}
            sizes = list(self.tile_size.values())
        else:
            sizes = [] if self.tile_size is None else [self.tile_size]
        for size in sizes:
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"SparseConfig.tile_size must be a positive int (or a dict of them), got {size!r}.")
        if self.dilation < 0 or self.input_dilation < 0:
            raise ValueError("SparseConfig.dilation and input_dilation must be >= 0.")
        if not 0.0 <= self.pyramid_threshold < 1.0:
            raise ValueError(f"SparseConfig.pyramid_threshold must be in [0, 1), got {self.pyramid_threshold}.")
        if self.dense_below < 0:
            raise ValueError(f"SparseConfig.dense_below must be >= 0, got {self.dense_below}.")
        self.attention = AttentionMode.parse(self.attention, "SparseConfig.attention")
        self.norm_stats = NormStats.parse(self.norm_stats, "SparseConfig.norm_stats")
        self.dit_context = DiTContext.parse(self.dit_context, "SparseConfig.dit_context")
        self.dit_cache = DiTCache.parse(self.dit_cache, "SparseConfig.dit_cache")
        if isinstance(self.dit_kv_share, bool) or not isinstance(self.dit_kv_share, int) or self.dit_kv_share < 1:
            raise ValueError(
                f"SparseConfig.dit_kv_share is how many neighbouring steps share one step's keys and values: an int "
                f">= 1 (1: every step keeps its own), got {self.dit_kv_share!r}."
            )
        if not 0.0 <= self.max_region_fraction <= 1.0:
            raise ValueError(f"SparseConfig.max_region_fraction must be in [0, 1], got {self.max_region_fraction}.")
        if not 0.0 <= self.change_threshold < 255.0:
            raise ValueError(
                f"SparseConfig.change_threshold is in 8-bit pixel units, in [0, 255), got {self.change_threshold}."
            )
        if not 0.0 <= self.dense_threshold <= 1.0:
            raise ValueError(f"SparseConfig.dense_threshold must be in [0, 1], got {self.dense_threshold}.")

        if self.cache_dtype is not None and self.cache_dtype not in (*_CACHE_DTYPES, "auto"):
            raise ValueError(
                f"SparseConfig.cache_dtype must be 'auto', one of {_CACHE_DTYPES} or None, got {self.cache_dtype!r}."
            )
        parse_bytes(self.cache_budget, "SparseConfig.cache_budget")
        if self.cache_dtype == "int8" and self.exact:
            raise ValueError(
                "SparseConfig(cache_dtype='int8') rounds the cached context; exact mode reads it bit for bit. Use "
                "cache_dtype=None (or 'auto') with exact=True."
            )

    @property
    def budget_bytes(self) -> int | None:
        """`cache_budget` in bytes (`None`: no budget)."""
        return parse_bytes(self.cache_budget, "SparseConfig.cache_budget")

    @property
    def storage_dtype(self) -> str | None:
        """The cache dtype the model-level API uses: `cache_dtype`, with `"auto"` meaning the model's dtype."""
        return None if self.cache_dtype == "auto" else self.cache_dtype

    def tile_for(self, height: int, channels: int | None = None) -> int:
        """The output tile edge to use on a feature map of the given height (and channel count, for the default)."""
        if self.tile_size is None:
            return 1 if height <= 32 and (channels or 0) >= 256 else 8
        if isinstance(self.tile_size, int):
            return self.tile_size
        if height in self.tile_size:
            return self.tile_size[height]
        return self.tile_size.get(0, 8)


_TEXT_REGIONS = tuple(m.value for m in RegionMethod)
_INJECTIONS = tuple(m.value for m in Injection)


@dataclass
class TextEditConfig(_ConfigMixin):
    """How a prompt edit finds the region it changes (FISEdit, Yu et al., AAAI 2024) and keeps the layout.

    Args:
        region (`str`, defaults to `"latent_diff"`):
            How the region is found. `"latent_diff"` (FISEdit's): the edited prompt runs densely for the first
            `detect_steps` steps from the capture's noise; each step's `sum over channels |z_edit - z_orig|` is min-max
            normalised and summed, Otsu's threshold splits the sum and a small opening removes specks; the remaining
            steps run sparse, starting from the dense latents inside the region. `"cross_attention"`
            (Prompt-to-Prompt's LocalBlend): the cross-attention maps of the tokens that differ between the two
            prompts (source maps from the capture, target maps from the same dense steps), max-pooled, normalised
            and thresholded, source and target words united. `"noise_diff"` (DiffEdit): the difference of the noise
            predictions under both prompts on the noised result, averaged over `noise_samples` draws, thresholded at
            `noise_threshold` times its mean; every step then runs sparse. `"mask"`: the caller passes
            `edit(region=...)`; every step runs sparse. An explicit `region` always wins.
        detect_steps (`int`, *optional*):
            Dense steps for `"latent_diff"`/`"cross_attention"`; defaults to 20% of the steps (FISEdit: 10 of 50), at
            least 1.
        opening (`int`, defaults to `2`):
            Edge, in latent pixels, of the square opening applied to the detected region (`0`: none). Where the opening
            would remove the whole region of an image, the region is kept unopened.
        dilation (`int`, defaults to `1`):
            Latent pixels added around the region; outside it, every step's latents are the capture's. (The UNet's
            `SparseConfig.input_dilation` is added on top for the computation.)
        attention_threshold (`float`, defaults to `0.3`):
            `"cross_attention"`: threshold on the max-normalised maps (LocalBlend's 0.3).
        attention_downscale (`int`, defaults to `4`):
            `"cross_attention"`: maps come from the cross-attention layers whose resolution is nearest the latent size
            divided by this (16x16 for a 64x64 latent, as LocalBlend).
        noise_threshold (`float`, defaults to `1.5`):
            `"noise_diff"`: a latent pixel is in the region when its difference exceeds this times the mean.
        noise_samples (`int`, defaults to `4`), noise_strength (`float`, defaults to `0.5`), seed (`int`, `0`):
            `"noise_diff"`: noise draws, the noise level they are added at (as a fraction of the training
            timesteps) and their seed.
        inject_attention (`float`, defaults to `0.0`):
            Prompt-to-Prompt layout keeping: during this fraction of the steps (from the first; P2P uses 0.8) the
            conditional branch's cross-attention probabilities of unchanged tokens are the capture's. The capture
            stores them when the editor's `text_config` asks for injection (memory: about 66 MB per step in float32
            for SD 1.5 at 512 px).
        injection (`str`, defaults to `"refine"`):
            `"refine"` injects the aligned (unchanged) tokens and keeps the new tokens' own maps (any prompt
            lengths); `"replace"` injects every token's map (prompts of equal token length: a word swap).
        version (`int`): config schema version, for JSON round-trips.
    """

    region: RegionMethod | str = RegionMethod.LATENT_DIFF
    detect_steps: int | None = None
    opening: int = 2
    dilation: int = 1
    attention_threshold: float = 0.3
    attention_downscale: int = 4
    noise_threshold: float = 1.5
    noise_samples: int = 4
    noise_strength: float = 0.5
    seed: int = 0
    inject_attention: float = 0.0
    injection: Injection | str = Injection.REFINE
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self):
        self.region = RegionMethod.parse(self.region, "TextEditConfig.region")
        if self.detect_steps is not None and self.detect_steps < 1:
            raise ValueError(f"TextEditConfig.detect_steps must be >= 1 (or None), got {self.detect_steps}.")
        if self.opening < 0 or self.dilation < 0:
            raise ValueError("TextEditConfig.opening and dilation must be >= 0.")
        if self.attention_downscale < 1 or self.noise_samples < 1:
            raise ValueError("TextEditConfig.attention_downscale and noise_samples must be >= 1.")
        if not 0.0 < self.noise_strength < 1.0:
            raise ValueError(f"TextEditConfig.noise_strength must be in (0, 1), got {self.noise_strength}.")
        if not 0.0 <= self.inject_attention <= 1.0:
            raise ValueError(f"TextEditConfig.inject_attention must be in [0, 1], got {self.inject_attention}.")
        self.injection = Injection.parse(self.injection, "TextEditConfig.injection")

    def steps_for(self, total: int) -> int:
        """Dense detection steps out of `total` denoising steps."""
        k = self.detect_steps if self.detect_steps is not None else max(1, round(0.2 * total))
        return min(k, total)

    def inject_steps(self, total: int) -> int:
        """How many of `total` steps (from the first) get the capture's attention injected."""
        return int(round(self.inject_attention * total))


_REUSE = ("encoder", "deep", "encoder+deep")
# Faster Diffusion's key steps (Li et al., NeurIPS 2024), as loop indices: SD with DDIM-50, and DPM-Solver-20 (the
# paper's {20, 19, 18, 17, 15, 10, 5} counted down from 20).
PAPER_KEY_STEPS = {"ddim50": (50, (0, 1, 2, 3, 5, 10, 15, 25, 35)), "dpm20": (20, (0, 1, 2, 3, 5, 10, 15))}


@dataclass
class TemporalConfig(_ConfigMixin):
    """Temporal reuse across denoising steps: Faster Diffusion's encoder propagation (Li et al., NeurIPS 2024) and
    DeepCache's deep-feature reuse (Ma et al., CVPR 2024), in one schedule.

    At a key step the model runs whole and its reusable features are kept; at the other steps those features are
    reused from the last key step.

    Args:
        key_steps (`str` or `list[int]`, defaults to `"auto"`):
            Loop indices (0 = the first step the pipeline runs) of the key steps, or a preset: `"ddim50"` (the paper's
            SD DDIM-50 schedule `[0, 1, 2, 3, 5, 10, 15, 25, 35]`), `"dpm20"` (its DPM-Solver-20 schedule
            `[0, 1, 2, 3, 5, 10, 15]`), or `"auto"` (`"ddim50"` from 35 steps on, else `"dpm20"`). A preset keeps
            steps 0-3 (the features change fastest at the start) and rescales the later ones to the step count.
            Step 0 is always a key step.
        every (`int`, *optional*):
            Every k-th step is a key step (DeepCache's uniform interval); overrides `key_steps`.
        reuse (`str`, defaults to `"encoder"`):
            What a non-key step reuses. `"encoder"` (Faster Diffusion): the whole encoder (UNet: `conv_in`, down
            blocks and mid block; DiT: the first `encoder_blocks` blocks); the decoder runs. `"deep"` (DeepCache): the
            shallow skip branches down to `skip_level` run, on the current input, and everything deeper is reused.
            `"encoder+deep"` (UNets): both, so only the decoder layers of the shallow branches run.
        skip_level (`int`, defaults to `1`):
            `"deep"`/`"encoder+deep"`: UNet skip connections `0..skip_level` (0 = `conv_in`'s, then one per
            resnet/attention layer and downsampler of the down blocks, shallowest first) stay computed with the decoder
            layers that consume them; DiT: the first and last `skip_level + 1` blocks run, and the blocks between
            reuse their residual (output minus input) from the key step.
        parallel (`bool`, defaults to `False`):
            A non-key decoder never reads the current latent, so the decoder passes of all non-key steps up to the
            next key step run as one batch (with guidance batched inside), and the scheduler then steps through them
            one by one. Needs `reuse="encoder"` or `"encoder+deep"`, the pipeline-level `enable` (it knows the coming
            timesteps) and a first-order scheduler.
        parallel_batch (`int`, *optional*):
            At most this many steps per batched decoder call (memory); `None`: up to the next key step.
        prior_noise (`float`, defaults to `0.003`):
            Prior noise injection: after each step at a timestep below `prior_noise_below`, `z += prior_noise * z_T`
            with `z_T` the loop's first latent in units of the scheduler's initial noise sigma (the paper's
            `z_t += 0.003 z_T` for t < 500). Applied only when the schedule reuses something (a schedule of key steps
            alone is dense and stays bit-identical). `0` turns it off.
        prior_noise_below (`float`, defaults to `500`):
            The timestep threshold for `prior_noise`.
        encoder_blocks (`int`, *optional*):
            DiT-family transformers: the first this many blocks act as the encoder; default 18 of 28 (the paper's),
            scaled to the model's depth.
        version (`int`): config schema version, for JSON round-trips.
    """

    key_steps: str | list[int] = "auto"
    every: int | None = None
    reuse: str = "encoder"
    skip_level: int = 1
    parallel: bool = False
    parallel_batch: int | None = None
    prior_noise: float = 0.003
    prior_noise_below: float = 500.0
    encoder_blocks: int | None = None
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self):
        if isinstance(self.key_steps, str):
            if self.key_steps != "auto" and self.key_steps not in PAPER_KEY_STEPS:
                raise ValueError(
                    f"TemporalConfig.key_steps must be 'auto', one of {sorted(PAPER_KEY_STEPS)} or a list of step "
                    f"indices, got {self.key_steps!r}."
                )
        else:
            steps = [int(i) for i in self.key_steps]
            if not steps or 0 not in steps or min(steps) < 0:
                raise ValueError(
                    f"TemporalConfig.key_steps must hold step 0 and no negative index (the first step has nothing to "
                    f"reuse), got {list(self.key_steps)}."
                )
            self.key_steps = sorted(set(steps))
        if self.every is not None and self.every < 1:
            raise ValueError(f"TemporalConfig.every must be >= 1, got {self.every}.")
        if self.reuse not in _REUSE:
            raise ValueError(f"TemporalConfig.reuse must be one of {_REUSE}, got {self.reuse!r}.")
        if self.skip_level < 0:
            raise ValueError(f"TemporalConfig.skip_level must be >= 0, got {self.skip_level}.")
        if self.parallel and self.reuse == "deep":
            raise ValueError(
                "TemporalConfig(parallel=True) batches decoder passes that must not read the current latent, but "
                "reuse='deep' recomputes the shallow encoder on it; use reuse='encoder' or 'encoder+deep'."
            )
        if self.parallel_batch is not None and self.parallel_batch < 1:
            raise ValueError(f"TemporalConfig.parallel_batch must be >= 1, got {self.parallel_batch}.")
        if self.prior_noise < 0:
            raise ValueError(f"TemporalConfig.prior_noise must be >= 0, got {self.prior_noise}.")
        if self.encoder_blocks is not None and self.encoder_blocks < 1:
            raise ValueError(f"TemporalConfig.encoder_blocks must be >= 1, got {self.encoder_blocks}.")

    def key_steps_for(self, total: int) -> list[int]:
        """The key steps of a loop of `total` steps, as sorted loop indices."""
        if self.every is not None:
            steps = set(range(0, total, self.every))
        elif isinstance(self.key_steps, str):
            name = self.key_steps if self.key_steps != "auto" else ("ddim50" if total >= 35 else "dpm20")
            ref, base = PAPER_KEY_STEPS[name]
            steps = {i for i in base if i < 4} | {round(i * total / ref) for i in base if i >= 4}
        else:
            steps = set(self.key_steps)
        return sorted(i for i in steps | {0} if i < total)

    @property
    def needs_total(self) -> bool:
        """Whether the schedule depends on the number of steps (a preset)."""
        return self.every is None and isinstance(self.key_steps, str)
