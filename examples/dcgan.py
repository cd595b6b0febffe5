"""A DCGAN (two models, two optimizers) that survives spot interruptions, through ``spotsafe.Run``.

    python examples/dcgan.py --store /mnt/spotsafe/runs/dcgan          # or s3://bucket/runs/dcgan
    python -m spotsafe.simulate rehearse --notice-after-steps 150 --preemptions 2 -- python examples/dcgan.py
    spotsafe report checkpoints/dcgan -o report.html                   # the run's story, sample grids included

The generator and the discriminator, and their two Adam optimizers, go to
``spotsafe.Run`` as mappings (``model={"G": netG, "D": netD}``): no hand-merged state
dicts. After every evaluation epoch a grid of samples from a fixed noise batch is kept
in the store (``run.log_image``) and shown by ``spotsafe report``; the losses and
D(x)/D(G(z)) passed to ``run.step`` become its curves.

Data (``--data``): ``digits`` (scikit-learn's 1,797 real handwritten 8x8 digits,
shipped inside the package, resized to 16x16: no internet needed) or ``fake``
(torchvision's ``FakeData``, random images, for smoke tests).
The lines changed for spotsafe are marked ``# spotsafe``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spotsafe  # spotsafe

SIZE = 16  # image side
NZ = 32  # latent size


class Generator(nn.Module):
    """z (NZ x 1 x 1) -> a 1 x 16 x 16 image in [-1, 1], DCGAN-style (transposed convs, batch norm)."""

    def __init__(self, nz: int = NZ, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, width * 2, 4, 1, 0, bias=False),  # 4x4
            nn.BatchNorm2d(width * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(width * 2, width, 4, 2, 1, bias=False),  # 8x8
            nn.BatchNorm2d(width),
            nn.ReLU(True),
            nn.ConvTranspose2d(width, 1, 4, 2, 1, bias=False),  # 16x16
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """A 1 x 16 x 16 image -> one logit (real or generated)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1, bias=False),  # 8x8
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),  # 4x4
            nn.BatchNorm2d(width * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width * 2, 1, 4, 1, 0, bias=False),  # 1x1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)


def init_weights(m: nn.Module) -> None:
    """The DCGAN paper's initialisation."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def digits() -> TensorDataset:
    """scikit-learn's handwritten digits, 8x8 -> 16x16, scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return TensorDataset(x * 2 - 1)


def fake(n: int = 512) -> TensorDataset:
    """torchvision's FakeData (random images, offline), as 1 x 16 x 16 tensors in [-1, 1]."""
    from torchvision import datasets, transforms

    ds = datasets.FakeData(size=n, image_size=(1, SIZE, SIZE), num_classes=1, transform=transforms.ToTensor())
    return TensorDataset(torch.stack([ds[i][0] for i in range(n)]) * 2 - 1)


def sample_grid(net_g: nn.Module, noise: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Samples from a fixed noise batch as one image grid in [0, 1] (the same noise every epoch)."""
    from torchvision.utils import make_grid

    was_training = net_g.training
    net_g.eval()
    with torch.no_grad():
        images = net_g(noise)
    net_g.train(was_training)
    return make_grid(images, nrow=nrow, padding=1, normalize=True, value_range=(-1, 1))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DCGAN on handwritten digits that survives spot interruptions")
    p.add_argument("--data", choices=["digits", "fake"], default="digits")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=1, help="keep a sample grid every N epochs")
    p.add_argument("--store", help="checkpoint store (default: $SPOTSAFE_STORE or ./checkpoints/dcgan)")
    p.add_argument("--every-seconds", type=float, default=60.0, help="periodic checkpoint interval")
    p.add_argument("--every-steps", type=int, help="also checkpoint every N steps")
    p.add_argument("--report-every", type=float, default=300.0, help="seconds between live report pages")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("spotsafe.checkpoint").setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    data = digits() if args.data == "digits" else fake()
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    net_g, net_d = Generator(), Discriminator()
    net_g.apply(init_weights)
    net_d.apply(init_weights)
    opt_g = torch.optim.Adam(net_g.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=args.lr, betas=(0.5, 0.999))
    # The grid's noise is fixed by its own generator: the same 64 faces of the latent space every epoch.
    fixed_noise = torch.randn(64, NZ, 1, 1, generator=torch.Generator().manual_seed(1234))

    store = args.store or os.environ.get("SPOTSAFE_STORE") or "checkpoints/dcgan"
    run = spotsafe.Run(  # spotsafe
        store,
        model={"G": net_g, "D": net_d},  # two models, two optimizers: no state dicts merged by hand
        optimizer={"G": opt_g, "D": opt_d},
        every_seconds=args.every_seconds,
        every_steps=args.every_steps,
        report_every=args.report_every,
    )
    if run.resumed_from is not None:
        print(f"resumed from step {run.step_count} (epoch {run.epoch}, batch {run.batch})", flush=True)
    print(f"data: {args.data} ({len(data)} images), {args.epochs} epochs of {len(loader)} steps", flush=True)

    for epoch in run.epochs(args.epochs):  # spotsafe
        for (real,) in run.batches(loader):  # spotsafe
            n = real.size(0)
            ones, zeros = torch.ones(n), torch.zeros(n)
            # (1) the discriminator: real -> 1, generated -> 0
            noise = torch.randn(n, NZ, 1, 1)
            generated = net_g(noise)
            opt_d.zero_grad()
            out_real = net_d(real)
            out_fake = net_d(generated.detach())
            loss_d = F.binary_cross_entropy_with_logits(out_real, ones) + F.binary_cross_entropy_with_logits(
                out_fake, zeros
            )
            loss_d.backward()
            opt_d.step()
            # (2) the generator: make the discriminator say 1
            opt_g.zero_grad()
            out = net_d(generated)
            loss_g = F.binary_cross_entropy_with_logits(out, ones)
            loss_g.backward()
            opt_g.step()
            run.step(  # spotsafe
                loss_d=loss_d.detach(),
                loss_g=loss_g.detach(),
                d_real=torch.sigmoid(out_real).mean().detach(),
                d_fake=torch.sigmoid(out_fake).mean().detach(),
            )
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            run.log_image(
                "samples", sample_grid(net_g, fixed_noise)
            )  # spotsafe: kept in the store, shown by the report
            print(
                f"epoch {epoch + 1}/{args.epochs}: loss_D {loss_d.item():.3f} loss_G {loss_g.item():.3f} "
                f"(step {run.step_count})",
                flush=True,
            )
    run.finish()  # spotsafe
    print(f"done at step {run.step_count}; the story: spotsafe report {store} -o report.html", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
