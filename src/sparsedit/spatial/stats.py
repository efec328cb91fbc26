"""What the last run of a sparsified model computed: `last_stats`, `time_breakdown`, `output_regions`."""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn

from .attachment import attachment_of


def output_regions(model: nn.Module):
    """Where the outputs of the model's last sparse run differ from the capture: its output's structure with a
    `[B, H, W]` bool region for each feature map, or `None` when that run was dense (a fallback: changed
    everywhere). Feed them to a downstream model's `editing(input_regions=...)`."""
    return attachment_of(model).output_regions


def time_breakdown(records, seconds: float) -> dict[str, float]:
    """Where a run's time went, summed over its layers: `plan` (tile indices; zero once the edit's plan is built),
    `gather`, `compute`, `scatter` (including undo logs), `dense` (layers computed whole), and `other`: everything
    outside the layers' sparse paths (region tracking, glue arithmetic between layers, hooks, Python)."""
    out = dict.fromkeys(("plan", "gather", "compute", "scatter", "dense"), 0.0)
    for r in records:
        for part, t in r.time.items():
            out[part] = out.get(part, 0.0) + t
    out["other"] = max(0.0, seconds - sum(out.values()))
    return out


def last_stats(model: nn.Module, *, detail: bool = True) -> dict:
    """What the last run inside `capturing`, `editing` or `profiling` computed.

    Returns:
        A dict with `macs_dense` (what a dense run costs), `macs_sparse` (what this run computed), `active_fraction`
        (per output resolution `"HxW"`: mean fraction of positions computed by its layers), `input_active_fraction`,
        `seconds`, `cache_bytes`, `dense_layers` (layers that ran densely, with the reason), `dense_run` (why the
        whole run was one plain dense forward: the region's size or a measurement; `None` otherwise), `time` (the run's seconds
        by part, see `time_breakdown`) and `layers` (per call, each with its `seconds` and `time` by part). With
        `detail=False`, `cache_bytes` and `layers` are left out (they cost a pass over every cache entry and
        record: a diffusion loop asks once per step).
    """
    att = attachment_of(model)
    st = att.state
    by_res = defaultdict(list)
    for r in st.records:
        by_res[f"{r.resolution[0]}x{r.resolution[1]}"].append(r.active_fraction)
    region = st.input_region
    return {
        "macs_dense": sum(r.macs_dense for r in st.records),
        "macs_sparse": sum(r.macs_sparse for r in st.records),
        "active_fraction": {k: sum(v) / len(v) for k, v in by_res.items()},
        "input_active_fraction": float(region.float().mean()) if region is not None else 1.0,
        "seconds": att.seconds,
        **({"cache_bytes": st.cache.nbytes} if detail else {}),
        "dense_layers": {r.name: r.dense_reason for r in st.records if r.dense_reason},
        "dense_run": att.last_dense_run,
        "time": time_breakdown(st.records, att.seconds),
        **({"layers": [vars(r).copy() for r in st.records]} if detail else {}),
    }
