"""How well the server predicts a capture's time (`sparsedit.serve.cost`, `--max-request-seconds`): for each shipped
model, the cost model is measured once at the native size, then captures at larger sizes are predicted and run.

    python benchmarks/serve_cost.py --sizes 128 256 512

Prints one row per model and size: predicted seconds, measured seconds (one dense capture, the session's first
after a warm-up at that size), their ratio, and the MACs counted on the meta device against the engine's count.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["scene-ddpm", "scene-sd-img2img", "scene-spade"])
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512])
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)

    from profile_edit import cpu_name

    from sparsedit.serve.cost import reference_state, steps_run
    from sparsedit.serve.models import ModelRegistry, SessionEditor

    registry = ModelRegistry()
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, loadavg {open('/proc/loadavg').read().split()[:3]}")
    rows = []
    for name in args.models:
        model = registry.get(name)
        started = time.perf_counter()
        cost = model.cost()
        measure = time.perf_counter() - started
        options = {**model.defaults, "steps": args.steps, "seed": 0}
        steps = steps_run(model, options)
        for size in args.sizes:
            state = reference_state(model, size)
            predicted = cost.predict(size, size, steps)
            times, engine = [], None
            for _ in range(2):  # the first warms up (allocations at this size); the second is timed
                editor = SessionEditor(model, options)
                t = time.perf_counter()
                editor.capture(state)
                times.append(time.perf_counter() - t)
                engine = editor.editor.last_stats.get("macs_dense") if hasattr(editor.editor, "last_stats") else None
                editor.close()
            row = {"model": name, "size": size, "steps": steps, "predicted_s": round(predicted, 2),
                   "measured_s": round(times[-1], 2), "ratio": round(predicted / times[-1], 2),
                   "macs_meta": cost._macs((size, size), steps) if model.kind != "gan" else None,
                   "macs_engine": engine, "cost_measure_s": round(measure, 1)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"# loadavg after {open('/proc/loadavg').read().split()[:3]}, pid {os.getpid()}")


if __name__ == "__main__":
    main()
