"""An Accelerate script whose spotsafe addition is AcceleratedRun and its loop calls (argv: OUT_DIR).

Rank 0 writes the final weights to OUT/weights.pt. See _pause.py for the test scaffolding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _data import Data
from _pause import Fetches, Pause

from spotsafe.integrations.accelerate import AcceleratedRun

BATCH, EPOCHS = 4, 3


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    accelerator = Accelerator(cpu=True)
    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
    loader = DataLoader(Data(Fetches(out, rank)), batch_size=BATCH, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    run = AcceleratedRun(accelerator, every_steps=4)
    pause = Pause(out, rank)
    for _epoch in run.epochs(EPOCHS):
        model.train()
        for x, y in run.batches(loader):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            run.step()
            pause.after_step(run.step_count, run.watcher)
    run.finish()
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).state_dict(), out / "weights.pt")


if __name__ == "__main__":
    main()
