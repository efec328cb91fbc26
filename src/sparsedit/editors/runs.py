"""A capture and an edit as objects: the state a run shares between its steps is the object's fields, the steps are
its methods, and one method builds its `EditStats` (k-diffusion's samplers report through a callback; diffusers'
`__call__` reads top to bottom: `CaptureRun.run` and `EditRun.run` do).

`Loop` (loop.py; passed in as `loop`, not imported) owns the sparsified models and the public steps (`prepare`,
`predictor`, `run`); a run drives them once and returns the `Capture` or the decoded edit with its statistics. The
loop decides what to keep.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from ..fingerprints import scheduler_fingerprint, text_fingerprint, weights_checksum
from ..regions import dilate, to_latents, to_pixels
from ..spatial import calibrate, calibration_of, capturing, editing, last_stats, output_regions, prefetch, scope
from ..stats import EditStats
from .capture import Capture, guidance_copies


__all__ = ["CaptureRun", "EditRun"]


def _finite(decoded: torch.Tensor, message: str) -> None:
    if not bool(torch.isfinite(decoded).all()):
        raise FloatingPointError(message)


def calibration_summary(model) -> dict | None:
    """What the sparse-or-dense choice of `model` read (`last_stats["calibration"]`): its break-even and what it was
    measured for; `None`: not calibrated (only `max_region_fraction` decides)."""
    cal = calibration_of(model)
    return None if cal is None else {"break_even": cal.break_even, "dense_seconds": cal.dense_seconds,
                                     "about": cal.about}  # fmt: skip


class CaptureRun:
    """One dense run of the pipeline that fills every model's cache (`Loop.capture`)."""

    def __init__(self, loop, x0, mask, call, generator, state, timesteps, embeds, inputs, text_config):
        self.loop, self.x0, self.mask, self.call, self.inputs = loop, x0, mask, call, inputs
        self.generator, self.state, self.timesteps, self.embeds = generator, state, timesteps, embeds
        self.text_config = text_config
        self.computed = self.step_macs = self.control_macs = 0  # MACs run, and the largest step's (the dense cost)

    def run_unet(self, i, call_unet, regions=None):
        unet = self.loop.unet
        with scope(unet, i):
            out = call_unet()
        # A step that reuses features (temporal) computes less; a whole step (a key step) is the dense cost.
        self.computed += last_stats(unet)["macs_dense"]
        self.step_macs = max(self.step_macs, last_stats(unet)["macs_dense"])
        return out

    def run_control(self, i, call_control, n):
        controlnet = self.loop.controlnet
        with scope(controlnet, i):
            out = call_control()
        self.computed += last_stats(controlnet)["macs_dense"]
        self.control_macs = max(self.control_macs, last_stats(controlnet)["macs_dense"])
        return out, None

    def denoise(self, prep, copies):
        """Every step, densely, inside the models' capture contexts; returns the final latents, the trajectory and the
        recorded cross-attention (for prompt edits)."""
        loop, n = self.loop, len(self.timesteps)
        predict, copies = loop.predictor(self.embeds, self.call["guidance_scale"], prep, self.run_unet,
                                         self.run_control)  # fmt: skip
        recording = loop.prompt.record_attention(range(n), range(self.text_config.inject_steps(n)), prep["z"], copies,
                                                 self.text_config)  # fmt: skip
        try:
            # Calibrated once the attention recording is gone: the calibration replays the last step.
            with (
                capturing(loop.unet, spatial_inputs=loop.residual_inputs(), calibrate=False),
                loop.capturing_control(),
            ):
                z, trajectory = loop.run(prep, self.timesteps, self.generator, predict, lambda i, z: z)
        finally:
            attention = recording()
        return z, trajectory, attention

    def run(self) -> tuple[Capture, EditStats]:
        loop, started = self.loop, time.perf_counter()
        loop.encoder_stats = []
        copies = guidance_copies(self.embeds, self.call["guidance_scale"], loop.adapter.batches_guidance)
        with loop.encoder_mode(capturing):
            prep = loop.prepare(self.x0, self.mask, self.generator, self.timesteps, self.call, self.inputs, copies)
        encoder_macs = sum(s["macs_dense"] for s in loop.encoder_stats)
        z, trajectory, attention = self.denoise(prep, copies)
        calibrated = time.perf_counter()
        for model in (loop.unet, loop.controlnet):
            if model is not None:
                calibrate(model)
        calibrate_seconds = time.perf_counter() - calibrated
        decoded, decoder_macs = z, 0
        if loop.latent:
            with capturing(loop.pipe.vae.decoder):
                decoded = loop.adapter.decode(z)
            decoder_macs = last_stats(loop.pipe.vae.decoder)["macs_dense"]
        _finite(decoded, "the capture produced NaN or infinite values (the pipeline does too: an overflow in float16?); "
                         "nothing was cached. Run the pipeline in float32 or bfloat16.")  # fmt: skip
        step_macs, once = self.step_macs + self.control_macs, prep.get("extra_macs", 0)  # once: the control embedding
        cap = Capture(
            image=self.x0.clone() if isinstance(self.x0, torch.Tensor) else self.x0,
            mask=None if self.mask is None else self.mask.clone(),
            trajectory=trajectory,
            timesteps=self.timesteps,
            generator_state=self.state,
            generator_device=str(self.generator.device),
            call=self.call,
            embeds=self.embeds,
            latents={k: prep[k] for k in loop.adapter.kept if k in prep},
            decoded=decoded,
            scheduler=scheduler_fingerprint(loop.pipe.scheduler),
            attention=attention,
            step_macs=step_macs,
            macs=encoder_macs + (step_macs + once) * len(self.timesteps) + decoder_macs,
            conditions=dict(loop.adapter.conditions),
            text_fingerprint=text_fingerprint(loop.pipe),
            inputs={k: v.clone() for k, v in self.inputs.items()},
            checksums=weights_checksum(loop.components()),
            batched_guidance=loop.adapter.batches_guidance,
        )
        stats = EditStats.of({
            "macs_dense": cap.macs,
            # less than macs_dense when temporal reuse skips work
            "macs_sparse": encoder_macs + once + decoder_macs + self.computed,
            "active_fraction": {},
            "seconds": time.perf_counter() - started,
            "calibrate_seconds": calibrate_seconds,
        })  # fmt: skip
        return cap, stats


class EditRun:
    """One sparse edit against a capture (`Loop.edit`): every step recomputes only the region (and, for a prompt
    edit, the region its detection finds), with the capture's latents outside it.

    Fields: the capture and the edit's inputs; `keep`, the composite region at the UNet's resolution (the image
    region dilated, then united with a prompt edit's detected region); `unet_region`, `keep` for every guidance copy;
    the MACs, fractions, time and dense-step reasons the steps report (`totals`, `fractions`, `unet_time`,
    `reasons`)."""

    def __init__(self, loop, cap: Capture, x0, mask, inputs, region, commit: bool, change=None):
        self.loop, self.cap, self.x0, self.mask, self.inputs = loop, cap, x0, mask, inputs
        self.region, self.commit, self.change = region, commit, change
        self.batch = loop.adapter.batch(x0)
        loop.adapter.conditions = dict(cap.conditions or {})  # the capture's (a load or a prompt edit may follow)
        loop.adapter.use_options(cap.call)
        self.embeds = cap.embeds
        self.copies = cap.copies
        self.totals = defaultdict(int)
        self.fractions = defaultdict(list)
        self.unet_time = defaultdict(float)
        self.reasons = {}  # why UNet steps ran as plain dense forwards
        self.checked = {"unet": False, "controlnet": False}  # whether a step compared the fingerprint yet
        self.plain_macs = None  # a step's MACs once an uncommitted step ran as the plain UNet: see `run_unet`
        self.per_step_macs = 0
        self.start, self.detect_seconds = 0, 0.0
        self._pixels = None  # `pixels()`, once `keep` is final
        z_shape = cap.trajectory[0].shape[-2:]
        self.keep = dilate(to_latents(region, z_shape), loop.config.input_dilation)
        self.unet_region = self.keep.repeat(self.copies, 1, 1)
        self.text = False
        if change is not None:
            self.embeds = loop.embeds(
                change["prompt"], change["negative_prompt"], cap.call["guidance_scale"], self.batch
            )
            if torch.equal(self.embeds, cap.embeds) and change["region"] is None:
                change["unchanged"] = True  # e.g. only the negative prompt changed, without guidance
            self.text = not change.get("unchanged")
        self.changeable = ("encoder_hidden_states",) if loop.latent else ()
        if (
            self.text and cap.conditions
        ):  # SDXL's pooled embedding (SD3's `pooled_projections`) changes with the prompt
            self.changeable += loop.adapter.condition_inputs
        self.prefetching = loop.config.prefetch
        if self.prefetching is None:
            self.prefetching = loop.adapter.device.type == "cuda"

    # -- the steps, as the loop calls them --------------------------------------------------------------------------
    def count(self, stats) -> None:
        self.totals["macs_dense"] += stats["macs_dense"]
        self.totals["macs_sparse"] += stats["macs_sparse"]

    def run_control(self, i, call_control, n):
        # Like the UNet's: the ControlNet's weights are compared with the capture's at its first step only.
        controlnet = self.loop.controlnet
        with (
            editing(controlnet, region=self.keep.repeat(n, 1, 1), commit=self.commit, changeable=self.changeable,
                    check_weights=not self.checked["controlnet"]),
            scope(controlnet, i),
        ):  # fmt: skip
            self.checked["controlnet"] = True
            out = call_control()
            stats, regions = last_stats(controlnet, detail=False), output_regions(controlnet)
        self.count(stats)
        self.totals["dense_steps"] += stats["dense_run"] is not None
        return out, regions

    def run_unet(self, i, call_unet, regions=None):
        loop, unet = self.loop, self.loop.unet
        if self.plain_macs is not None:
            # The UNet's sparse-or-plain choice depends on this edit's region, the config and the calibration alone
            # (never on the step), so an uncommitted edit whose step ran as the plain UNet runs every later step so:
            # the same call without the per-step work of deciding it again (the cache check, the region, the stats:
            # about 1 ms a step on a small UNet). Committing edits, ControlNet's per-step regions and temporal reuse
            # take the full path.
            started = time.perf_counter()
            out = call_unet()
            self.unet_time["other"] += time.perf_counter() - started
            self.totals["macs_dense"] += self.plain_macs
            self.totals["macs_sparse"] += self.plain_macs
            self.totals["dense_steps"] += 1
            return out
        if self.prefetching and i + 1 < len(self.cap.timesteps):
            prefetch(unet, i + 1)  # the next step's entries, copied while this step computes
            if loop.controlnet is not None:
                prefetch(loop.controlnet, i + 1)
        # `Loop.check` compared every component's weights with the capture's before this edit; the UNet's own
        # fingerprint is checked at its first sparse step (about 1 ms a step otherwise).
        with (
            editing(unet, region=loop.adapter.denoiser_region(self.unet_region), commit=self.commit,
                    changeable=self.changeable,
                    input_regions=regions, check_weights=not self.checked["unet"]),
            scope(unet, i),
        ):  # fmt: skip
            self.checked["unet"] = True
            out = call_unet()
            stats = last_stats(unet, detail=False)
        # With temporal reuse a step runs only some layers; the dense reference is a whole step.
        self.totals["macs_dense"] += self.cap.step_macs if loop.temporal is not None else stats["macs_dense"]
        self.totals["macs_sparse"] += stats["macs_sparse"]
        for res, frac in stats["active_fraction"].items():
            self.fractions[res].append(frac)
        for part, t in stats["time"].items():
            self.unet_time[part] += t
        self.totals["dense_steps"] += stats["dense_run"] is not None
        if stats["dense_run"] is not None:
            self.reasons[stats["dense_run"]] = None
            if not self.commit and regions is None and loop.temporal is None and loop.controlnet is None:
                self.plain_macs = stats["macs_dense"]
        return out

    def run_dense(self, i, call_unet):
        self.totals["macs_dense"] += self.per_step_macs
        self.totals["macs_sparse"] += self.per_step_macs
        return call_unet()

    def composite(self, i, z):
        return torch.where(self.keep[:, None], z, self.cap.trajectory[i + 1])

    # -- the run ----------------------------------------------------------------------------------------------------
    def unchanged(self, started: float):
        """Nothing changed: the current result, at no cost."""
        cap = self.cap
        if self.commit and self.change is not None:
            cap.call["prompt"], cap.call["negative_prompt"] = self.change["prompt"], self.change["negative_prompt"]
        stats = EditStats.of({"macs_dense": cap.macs, "macs_sparse": 0, "active_fraction": {}, "region_fraction": 0.0,
                              "detect_seconds": 0.0, "seconds": time.perf_counter() - started,
                              "background": "unchanged"})  # fmt: skip
        h, w = cap.decoded.shape[-2:]
        return cap.decoded.clone(), stats, torch.zeros(self.batch, h, w, dtype=torch.bool, device=self.keep.device)

    def detect(self, prep, generator):
        """A prompt edit's region search (the technique's dense steps); widens `keep` and returns where the sparse
        steps start and their starting latents."""
        loop, cap, change = self.loop, self.cap, self.change
        started = time.perf_counter()
        self.per_step_macs = cap.step_macs
        predict_dense, _ = loop.predictor(self.embeds, cap.call["guidance_scale"], prep, self.run_dense)
        found, start, z_dense = loop.prompt.detect(cap, change, self.embeds, prep, generator, self.copies,
                                                   predict_dense)  # fmt: skip
        self.keep = self.keep | dilate(found, change["config"].dilation)
        self.unet_region = self.keep.repeat(self.copies, 1, 1)
        z = torch.where(self.keep[:, None], z_dense, cap.trajectory[start]) if start else None
        self.detect_seconds = time.perf_counter() - started
        return start, z

    def denoise(self, generator):
        """Encode sparsely, find a prompt edit's region, then run every step sparse; returns the final latents, the
        trajectory and the prepared inputs."""
        loop, cap = self.loop, self.cap
        loop.encoder_stats = []
        with loop.encoder_mode(editing, region=self.region, commit=self.commit):
            prep = loop.prepare(self.x0, self.mask, generator, cap.timesteps, cap.call, self.inputs, self.copies,
                                keep=self.keep, cap=cap)  # fmt: skip
        for stats in loop.encoder_stats:
            self.count(stats)
        # Computed once per edit (the ControlNet's conditioning embedding); the pipeline does it at every step.
        self.totals["macs_dense"] += prep.get("extra_macs", 0) * len(cap.timesteps)
        self.totals["macs_sparse"] += prep.get("extra_macs", 0)
        z = None
        if self.text:
            self.start, z = self.detect(prep, generator)
        if not bool(self.keep.any()):  # nothing to regenerate: the current result, at no cost
            return cap.trajectory[-1], cap.trajectory, prep
        predict, _ = loop.predictor(self.embeds, cap.call["guidance_scale"], prep, self.run_unet, self.run_control)
        z, trajectory = loop.run(prep, cap.timesteps, generator, predict, self.composite, start=self.start, z=z)
        return z, cap.trajectory[: self.start] + trajectory, prep

    def decode(self, z) -> torch.Tensor:
        """The decoded result: the sparse VAE decoder on the region, the current image's decode outside it."""
        loop, cap = self.loop, self.cap
        if not loop.latent:
            return z
        if not bool(self.keep.any()):
            return cap.decoded.clone()
        decoder = loop.pipe.vae.decoder
        with editing(decoder, region=loop.adapter.decoder_region(self.keep), commit=self.commit):
            decoded = loop.adapter.decode(z)
            self.count(last_stats(decoder, detail=False))
        # The decoder is approximate near the region and its reach spans the image: outside the region, the pixels
        # are the current image's decode, bit for bit.
        return torch.where(self.pixels()[:, None], decoded, cap.decoded)

    def pixels(self) -> torch.Tensor:
        """`keep` at the image's resolution, once `keep` is final (after detection): built once, read by the decode's
        composite, the statistics and the caller."""
        if self._pixels is None:
            self._pixels = to_pixels(self.keep, self.cap.decoded.shape[-2:])
        return self._pixels

    def stats(self, started: float, check_seconds: float) -> EditStats:
        loop, cap, totals, steps = self.loop, self.cap, self.totals, len(self.cap.timesteps) - self.start
        reasons = "; ".join(self.reasons)
        ran_dense = None
        if totals["dense_steps"]:
            ran_dense = (
                reasons if totals["dense_steps"] >= steps else f"{totals['dense_steps']} of {steps} steps: {reasons}"
            )
        stats = EditStats.of({
            # A prompt edit is compared with regenerating densely: the capture's whole dense run.
            "macs_dense": cap.macs if self.text else totals["macs_dense"],
            "macs_sparse": totals["macs_sparse"],
            "active_fraction": {k: sum(v) / len(v) for k, v in self.fractions.items()},
            "region_fraction": float((self.pixels() if self.text else self.region).float().mean()),
            "detect_seconds": self.detect_seconds,
            "seconds": time.perf_counter() - started,
            "unet_time": dict(self.unet_time),  # the UNet's seconds by part, summed over the steps
            "check_seconds": check_seconds,  # the staleness check, weights checksum included
            "ran_dense": ran_dense,  # why UNet steps ran as plain dense forwards (all, or how many); None: sparse
            "dense_steps": totals["dense_steps"],
            "calibration": calibration_summary(loop.unet),
            "background": (
                "latents outside the dilated region are the capture's at every step; the VAE encoder and decoder run "
                "sparse and the pixels outside the region are composited from the current image's decode"
                if loop.latent
                else "exact: the pixels outside the dilated region are the capture's at every step"
            ),
        })  # fmt: skip
        if self.change is not None:
            stats["region_method"] = "mask" if self.change["region"] is not None else self.change["config"].region
            stats["detect_steps"] = self.start
        return stats

    def commit_to(self, trajectory, decoded, prep) -> None:
        """Last, when nothing can fail any more: the capture becomes the edited state."""
        cap, change = self.cap, self.change
        if self.loop.adapter.takes_image:
            cap.image = self.x0.clone()
            cap.mask = None if self.mask is None else self.mask.clone()
        cap.trajectory = trajectory
        cap.decoded = decoded
        cap.latents = {k: prep[k] for k in cap.latents}
        cap.inputs = dict(self.inputs)
        if change is not None:
            cap.call["prompt"], cap.call["negative_prompt"] = change["prompt"], change["negative_prompt"]
            cap.embeds = self.embeds
            cap.conditions = dict(self.loop.adapter.conditions)
        cap.version += 1

    def run(self, check_seconds: float = 0.0):
        """Returns the decoded result, its `EditStats` and the regenerated region at image resolution."""
        loop, cap = self.loop, self.cap
        started = time.perf_counter()
        if not self.text and not bool(self.keep.any()):
            loop.last_latents = cap.trajectory[-1]
            return self.unchanged(started)
        generator = cap.generator()
        inject = loop.prompt.injection(cap, self.change, self.batch, self.copies) if self.text else None
        loop.prompt.take_macs()  # the injection's set-up is not counted (as before the redesign)
        if loop.attention is not None:
            loop.attention.inject = inject
        try:
            z, trajectory, prep = self.denoise(generator)
        finally:
            if loop.attention is not None:
                loop.attention.idle()
        self.totals["macs_sparse"] += loop.prompt.take_macs()  # detection work a dense regeneration does not do
        decoded = self.decode(z)
        stats = self.stats(started, check_seconds)
        _finite(decoded, "the edit produced NaN or infinite values (an overflow: float16 activations?); nothing was "
                         "committed. Run the pipeline in float32 or bfloat16.")  # fmt: skip
        if self.commit:
            self.commit_to(trajectory, decoded, prep)
        loop.last_latents = z
        return decoded, stats, self.pixels()
