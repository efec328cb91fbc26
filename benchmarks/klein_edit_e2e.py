"""End-to-end reference-image edit on a FLUX.2 [klein]-shaped `Flux2KleinPipeline` through `SparseEditor` vs the
plain pipeline (issue 36).

The pipeline takes an input image as a reference in the transformer's sequence and generates from noise in
`--steps` (4: the distilled release). The transformer has FLUX.2 [klein] 4B's shape (3072 wide, 24 heads of 128, 128
packed latent channels, context 7680 wide) with `--layers` double- and `--single-layers` single-stream blocks (the
release has 5 + 20; fewer fit this machine's time, and make the VAE a larger share of the dense run, so the ratio is
conservative); the VAE has FLUX.2's shape (`AutoencoderKLFlux2`: 128/256/512/512, two layers per block, 32 latent
channels); random weights, built offline. The text encoder is a thin stand-in with the Qwen3-4B output shape (27
layers 2560 wide, of which the pipeline stacks 9, 18 and 27 into 7680-wide context tokens; 512 tokens), so the
transformer sees Klein's context; a real encoder would only add to the dense pipeline's time (an edit reuses the
capture's embeddings).

A brush stroke of `--fractions` of the image on the reference; dense (`pipe(image=edited, ...)`) and sparse
(`editor.edit(image=edited, commit=False)`) alternate in one process; medians; MACs from `editor.last_stats`; PSNR
against the dense result of the same edit.

    python benchmarks/klein_edit_e2e.py --size 1024 --dtype bfloat16 --fractions 0.02
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from dit_edit import flux2_klein_4b
from PIL import Image
from unet_edit import PIPELINE_HEADER, alternate, loadavg, pipeline_row, stroke_region

from sparsedit import SparseConfig, SparseEditor
from sparsedit.demo import load_photo
from sparsedit.testing import write_clip_tokenizer


def klein_pipeline(dtype: torch.dtype, layers: int, single: int):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import CLIPTokenizer, Qwen3Config, Qwen3ForCausalLM

    directory = tempfile.mkdtemp()
    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=512)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=2560, intermediate_size=8, num_hidden_layers=27, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )).eval()  # fmt: skip
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2().eval()
    torch.manual_seed(2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    pipe = Flux2KleinPipeline(transformer=flux2_klein_4b(layers, single).eval(), scheduler=scheduler, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, is_distilled=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def to_pil(x: torch.Tensor) -> Image.Image:
    a = (x[0].permute(1, 2, 0).float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--single-layers", type=int, default=4)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="untimed dense/sparse pairs before the timed ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--cache-dtype", default="auto", help="SparseConfig.cache_dtype (auto: int8 K/V under SparseEditor)"
    )
    ap.add_argument("--cache-budget", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = klein_pipeline(dtype, args.layers, args.single_layers)
    config = SparseConfig(input_dilation=1, cache_dtype=None if args.cache_dtype == "none" else args.cache_dtype,
                          cache_budget=args.cache_budget)  # fmt: skip
    editor = SparseEditor(pipe, config)
    photo, source = load_photo(args.size)
    image = to_pil((photo / 2 + 0.5).clamp(0, 1))
    kw = {"prompt": "a photo of an astronaut", "num_inference_steps": args.steps}
    t0 = time.perf_counter()
    editor.capture(image=image, generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    capture_s = time.perf_counter() - t0
    cache = editor.cache_bytes
    print(f"FLUX.2-klein-4B-shaped Flux2KleinPipeline ({args.layers} + {args.single_layers} blocks), {args.size} px, "
          f"{args.steps} steps, reference image in the sequence, {args.dtype}, cache dtype {args.cache_dtype}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}, load {loadavg()}")  # fmt: skip
    print(f"capture {capture_s:.1f} s, cache {cache / 2**30:.2f} GiB ({dict(cache.items())}), photo: {source}")
    print(PIPELINE_HEADER)
    rows = []
    for frac in args.fractions:
        region = stroke_region(args.size, frac, 1)[0].numpy()
        a = np.array(image)
        a[region] = (242, 26, 38)
        edited = Image.fromarray(a)
        dense_t, sparse_t, dense, sparse = alternate(
            lambda: pipe(image=edited, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images,
            lambda: editor.edit(image=edited, commit=False, output_type="pt").images,
            args.repeats, args.warmup,
        )  # fmt: skip
        stats = editor.last_stats
        rows.append(pipeline_row(stats, dense_t, sparse_t, dense, sparse, unet_time=stats["unet_time"],
                                 ran_dense=stats["ran_dense"]))  # fmt: skip
    meta = {"dtype": args.dtype, "cache_dtype": args.cache_dtype, "threads": torch.get_num_threads(),
            "layers": args.layers, "single_layers": args.single_layers, "repeats": args.repeats,
            "warmup": args.warmup, "size": args.size, "steps": args.steps, "capture_s": capture_s,
            "cache_bytes": int(cache), "cache_parts": dict(cache.items()), "config": config.to_dict(),
            "cpu": platform.processor() or platform.machine(), "loadavg_end": loadavg()}  # fmt: skip
    args.json = args.json or Path(f"benchmarks/results/klein_edit_e2e_{args.size}_{args.dtype}.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float))
    print(f"load at end {loadavg()}; wrote {args.json}")


if __name__ == "__main__":
    main()
