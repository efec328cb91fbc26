"""Train "scene-spade": a SPADE generator (GauGAN's architecture, small) from scene label maps to 64×64 images.

    python training/train_spade.py                      # trains, or resumes training/runs/scene-spade
    python training/train_spade.py --minutes 90 --threads 1
    python training/train_spade.py --install            # also write the generator's weights into the package

Losses: a conditional PatchGAN discriminator with the hinge loss (as SPADE) plus `--l1` × the L1 distance to the
rendered scene (pix2pix's reconstruction term; it stands in for SPADE's VGG loss, whose weights we cannot download).
Every `--save-every` steps the run directory gets `checkpoint.pt` (resume by running the same command again),
`scene-spade.safetensors` and `loss.csv`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import Run, batch_from, run_parser, scene_pool

from sparsedit import pretrained
from sparsedit.data import scenes


NAME = "scene-spade"


class PatchDiscriminator(nn.Module):
    """pix2pix's 70×70-style PatchGAN on (image, one-hot labels), spectral-normalised like SPADE's."""

    def __init__(self, in_channels: int, nf: int = 32, layers: int = 3):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        blocks, c = [], in_channels
        for k in range(layers):
            out = nf * 2**k
            blocks += [sn(nn.Conv2d(c, out, 4, stride=2 if k < layers - 1 else 1, padding=1)), nn.LeakyReLU(0.2)]
            c = out
        blocks.append(sn(nn.Conv2d(c, 1, 4, padding=1)))
        self.net = nn.Sequential(*blocks)

    def forward(self, image, onehot):
        return self.net(torch.cat([image, onehot], 1))


def main(argv=None):
    def model_args(p):
        p.add_argument("--lr-g", type=float, default=1e-4)
        p.add_argument("--lr-d", type=float, default=4e-4)  # TTUR, as SPADE
        p.add_argument("--l1", type=float, default=10.0, help="weight of the L1 reconstruction loss")

    args = run_parser(__doc__, NAME, model_args, argv)

    size = pretrained.ARCHITECTURES[NAME]["generator"]["size"][0]
    pool = scene_pool(args.pool, size)
    dev = torch.device(args.device)
    gen = pretrained.build(NAME).to(dev).train()
    disc = PatchDiscriminator(3 + gen.semantic_nc).to(dev)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr_g, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr_d, betas=(0.0, 0.9))
    run = Run(args.run, ["l1", "g_adv", "d_real", "d_fake"])

    def train_step(step: int) -> dict[str, float]:
        real, labels = batch_from(pool, step, args.batch, base_seed=2)
        real, labels = real.to(dev), labels.to(dev)
        onehot = gen.encode(labels)
        fake = gen(onehot)
        # discriminator: hinge loss
        d_real = F.relu(1 - disc(real, onehot)).mean()
        d_fake = F.relu(1 + disc(fake.detach(), onehot)).mean()
        opt_d.zero_grad(set_to_none=True)
        (d_real + d_fake).backward()
        opt_d.step()
        # generator: adversarial + L1
        g_adv = -disc(fake, onehot).mean()
        l1 = (fake - real).abs().mean()
        opt_g.zero_grad(set_to_none=True)
        (g_adv + args.l1 * l1).backward()
        opt_g.step()
        return {"l1": l1.item(), "g_adv": g_adv.item(), "d_real": d_real.item(), "d_fake": d_fake.item()}

    objects = {"gen": gen, "disc": disc, "opt_g": opt_g, "opt_d": opt_d}
    run.train(NAME, args, objects, export=gen, train_step=train_step)


assert scenes.NUM_CLASSES == pretrained.ARCHITECTURES[NAME]["generator"]["label_nc"]

if __name__ == "__main__":
    main()
