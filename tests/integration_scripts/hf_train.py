"""A Hugging Face Trainer script whose only spotsafe line is the callback (argv: OUT_DIR [ddp]).

A tiny BERT built from a config (nothing downloaded). Run as one process, or under
torchrun with ``ddp`` (2 CPU ranks, gloo). Rank 0 writes the final weights to
OUT/weights.pt. See _pause.py for the test scaffolding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from _data import Data
from _pause import Fetches, Pause

from spotsafe.integrations.transformers import SpotsafeCallback

BATCH, EPOCHS, SEQ = 4, 3, 8


class Scaffold(TrainerCallback):
    def __init__(self, pause: Pause, spotsafe_cb: SpotsafeCallback) -> None:
        self.pause, self.cb = pause, spotsafe_cb

    def on_step_end(self, args, state, control, **kwargs):
        self.pause.after_step(state.global_step, self.cb.run.watcher)


def main() -> None:
    out = Path(sys.argv[1])
    ddp = len(sys.argv) > 2 and sys.argv[2] == "ddp"
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
        ddp_backend="gloo" if ddp else None,
    )
    spotsafe_cb = SpotsafeCallback(every_steps=4, agree_every=1)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Data(Fetches(out, rank), seq=SEQ),
        callbacks=[spotsafe_cb, Scaffold(Pause(out, rank), spotsafe_cb)],
    )
    trainer.train()
    if rank == 0:
        torch.save(model.state_dict(), out / "weights.pt")


if __name__ == "__main__":
    main()
