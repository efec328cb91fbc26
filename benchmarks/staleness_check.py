"""The cost of the staleness check at edit time (issue 19): the content checksum of every component of an SD 1.5
pipeline (UNet, VAE, CLIP text encoder, random weights of the real sizes), against one 512 px edit's time.

    python benchmarks/staleness_check.py
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from unet_edit import loadavg, sd15, sd_vae  # noqa: E402

from sparsedit.guard import weights_checksum  # noqa: E402


def main():
    torch.set_num_threads(2)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    parts = {"unet": sd15().eval(), "vae": sd_vae().eval(),
             "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                          num_attention_heads=12, max_position_embeddings=77)).eval()}  # fmt: skip
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    weights_checksum(parts)  # warm
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        weights_checksum(parts)
        times.append(time.perf_counter() - t0)
    row = {"params": params, "checksum_s": statistics.median(times), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "load": loadavg()}  # fmt: skip
    print(json.dumps(row, indent=2))
    out = Path("benchmarks/results/staleness_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
