"""A small GAN learning a ring of eight Gaussians, ported to spotsafe (CPU, synthetic data, seconds).

    python examples/gan_ring.py --store checkpoints/gan_ring
    python -m spotsafe.resume --store checkpoints/gan_ring -- python examples/gan_ring.py

The shape that broke a first port of a DCGAN script: two models and two optimizers, and a
block that runs every N batches (here: samples from a fixed noise batch, drawn with the
generator in training mode, so its BatchNorm statistics move) keyed on the batch index. With
``enumerate(run.batches(loader))`` that index restarts at 0 after a mid-epoch resume and the
block runs once too often; ``run.enumerate(loader)`` continues it. The lines spotsafe adds are
marked ``# spotsafe`` (six of them); docs/run.md ("Porting a script") walks through them.
At the end it prints ``done:`` with a fingerprint of every weight and optimizer state, so an
interrupted and resumed run can be compared with an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spotsafe  # spotsafe

NZ = 8  # latent size


def ring(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` points from eight Gaussians on the unit circle."""
    k = torch.randint(0, 8, (n,), generator=generator).float()
    centers = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1)
    return centers + 0.05 * torch.randn(n, 2, generator=generator)


def generator_net(width: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(NZ, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
    )


def discriminator_net(width: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1)
    )


def fingerprint(*objects: object) -> str:
    """sha256 over every tensor of the objects' state dicts (weights, buffers, optimizer moments)."""
    h = hashlib.sha256()

    def feed(value: object) -> None:
        if isinstance(value, torch.Tensor):
            h.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        else:
            h.update(repr(value).encode())

    for obj in objects:
        feed(obj.state_dict())  # type: ignore[attr-defined]
    return h.hexdigest()[:16]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="a GAN on a ring of Gaussians that survives spot interruptions")
    p.add_argument("--store", default=None, help="checkpoint store (default: $SPOTSAFE_STORE)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--points", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sample-every", type=int, default=10, help="sample the fixed noise every N batches")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = ring(args.points, torch.Generator().manual_seed(args.seed))
    loader = DataLoader(TensorDataset(data), batch_size=args.batch_size, shuffle=True, drop_last=True)
    net_g, net_d = generator_net(), discriminator_net()
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-3, betas=(0.5, 0.999))
    fixed_noise = torch.randn(256, NZ)
    bce = nn.BCEWithLogitsLoss()
    run = spotsafe.Run(args.store, model={"G": net_g, "D": net_d}, optimizer={"G": opt_g, "D": opt_d})  # spotsafe

    for epoch in run.epochs(args.epochs, start=1):  # spotsafe
        for i, (real,) in run.enumerate(loader):  # spotsafe
            b = real.size(0)
            fake = net_g(torch.randn(b, NZ))
            loss_d = bce(net_d(real), torch.ones(b, 1)) + bce(net_d(fake.detach()), torch.zeros(b, 1))
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = bce(net_d(fake), torch.ones(b, 1))
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            if i % args.sample_every == 0:
                with torch.no_grad():
                    radius = net_g(fixed_noise).norm(dim=1).mean().item()  # train mode: BatchNorm stats move
                print(
                    f"epoch {epoch} batch {i}: loss_d {loss_d.item():.4f} loss_g {loss_g.item():.4f} radius {radius:.3f}"
                )
            run.step(loss_d=loss_d.item(), loss_g=loss_g.item())  # spotsafe
    run.finish()  # spotsafe
    print(f"done: {run.step_count} steps, fingerprint {fingerprint(net_g, net_d, opt_g, opt_d)}", flush=True)


if __name__ == "__main__":
    main()
