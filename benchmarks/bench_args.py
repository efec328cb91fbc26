"""Options the speed benchmarks share: CPU threads, the device, and turning the measured fallback off."""

from __future__ import annotations


def device_args(ap, fallback: bool = True) -> None:
    """`--threads`, `--device` and (with `fallback`) `--no-measured-fallback` on the parser `ap`."""
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N); timed regions are synchronized on CUDA")
    if fallback:
        ap.add_argument(
            "--no-measured-fallback",
            action="store_true",
            help="SparseConfig(measured_fallback=False): no calibration at capture, every edit runs sparse up to "
            "max_region_fraction (the engine's own speed, not the sparse-or-dense choice)",
        )
