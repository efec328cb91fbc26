"""Tiny Stable Diffusion pipelines for the tests (built offline by `sparsedit.testing`)."""

from sparsedit.testing import tiny_sd, tiny_sd_img2img, write_clip_tokenizer


__all__ = ["tiny_sd", "tiny_sd_img2img", "write_clip_tokenizer"]
