"""Conditional GAN generators with exact sparse editing: GauGAN (SPADE) and pix2pix."""

from .labels import encode_labels, instance_edges
from .pix2pix import Pix2PixGenerator
from .spade import SPADE, SPADEGenerator, SPADEResnetBlock, fold_spectral_norm


__all__ = [
    "SPADE",
    "Pix2PixGenerator",
    "SPADEGenerator",
    "SPADEResnetBlock",
    "encode_labels",
    "fold_spectral_norm",
    "instance_edges",
]
