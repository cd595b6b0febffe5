"""A Lightning script whose only spotsafe line is the callback (argv: OUT_DIR [ddp]).

Run as one process, or under torchrun with ``ddp`` (2 CPU ranks, gloo). Rank 0 writes
the final weights to OUT/weights.pt. See _pause.py for the test scaffolding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _data import Data
from _pause import Fetches, Pause

from spotsafe.integrations.lightning import SpotsafeCallback

BATCH, EPOCHS = 4, 3


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)}


class Scaffold(L.Callback):
    def __init__(self, pause: Pause, spotsafe_cb: SpotsafeCallback) -> None:
        self.pause, self.cb = pause, spotsafe_cb

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pause.after_step(trainer.global_step, self.cb.run.watcher)


def main() -> None:
    out = Path(sys.argv[1])
    ddp = len(sys.argv) > 2 and sys.argv[2] == "ddp"
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    L.seed_everything(0, verbose=False)
    loader = DataLoader(Data(Fetches(out, rank)), batch_size=BATCH, shuffle=True)
    spotsafe_cb = SpotsafeCallback(every_steps=4, agree_every=1)
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spotsafe_cb, Scaffold(Pause(out, rank), spotsafe_cb)],
    )
    model = Net()
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), out / "weights.pt")


if __name__ == "__main__":
    main()
