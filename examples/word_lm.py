"""A word-level LSTM language model, ported to spotsafe (CPU, a synthetic corpus, seconds).

    python examples/word_lm.py --store checkpoints/word_lm
    python -m spotsafe.resume --store checkpoints/word_lm -- python examples/word_lm.py

The shape that broke a first port of a classic language-model script: the LSTM's hidden state
is carried from one batch to the next, the learning rate is annealed by hand (divided by 4
when the validation loss stops improving), the best validation loss is kept, the parameters
are updated by hand (no optimizer object) and Ctrl+C breaks out of training early. All of the
loop's own state lives in one dict, ``S``, handed to ``spotsafe.Run(state=S)``: it is saved
with every checkpoint and restored in place, tensors included. The batches are a
``range`` of offsets into the token stream, which ``run.enumerate`` slices at the resumed
batch. The lines spotsafe adds are marked ``# spotsafe`` (six of them); docs/run.md
("Porting a script") walks through them. ``done:`` ends with a fingerprint of the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Sequence

import torch
from torch import nn

import spotsafe  # spotsafe


def corpus(words: int, vocab: int, seed: int) -> list[str]:
    """Text from a random bigram language: each word has a few likely successors."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 3), generator=g)
    out, w = [], 0
    for _ in range(words):
        w = (
            int(successors[w, torch.randint(0, 3, (1,), generator=g)])
            if torch.rand(1, generator=g) < 0.9
            else int(torch.randint(0, vocab, (1,), generator=g))
        )
        out.append(f"w{w}")
    return out


def batchify(ids: torch.Tensor, bsz: int) -> torch.Tensor:
    """The token stream as ``bsz`` columns, one continuous text each."""
    n = ids.size(0) // bsz
    return ids[: n * bsz].view(bsz, n).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


class LM(nn.Module):
    def __init__(self, ntoken: int, size: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = nn.Embedding(ntoken, size)
        self.rnn = nn.LSTM(size, size)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(size, ntoken)

    def forward(
        self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.rnn.hidden_size
        return (torch.zeros(1, bsz, size), torch.zeros(1, bsz, size))


def evaluate(model: LM, source: torch.Tensor, bptt: int, bsz: int) -> float:
    model.eval()
    total, hidden = 0.0, model.init_hidden(bsz)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            x, y = get_batch(source, i, bptt)
            out, hidden = model(x, hidden)
            total += len(x) * nn.functional.cross_entropy(out, y).item()
    model.train()
    return total / (len(source) - 1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="a word-level LSTM language model that survives spot interruptions")
    p.add_argument("--store", default=None, help="checkpoint store (default: $SPOTSAFE_STORE)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--words", type=int, default=2400)
    p.add_argument("--vocab", type=int, default=40)
    p.add_argument("--lr", type=float, default=40.0)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--bptt", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    words = corpus(args.words, args.vocab, args.seed)
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    ids = torch.tensor([vocab[w] for w in words])
    n_train, n_val = int(0.8 * len(ids)), int(0.1 * len(ids))
    train_data = batchify(ids[:n_train], args.batch_size)
    val_data = batchify(ids[n_train : n_train + n_val], args.batch_size)
    test_data = batchify(ids[n_train + n_val :], args.batch_size)
    model = LM(len(vocab))
    # The loop's own state beside the model: the annealed lr, the best validation loss, the hidden state.
    S = {"lr": args.lr, "best_val_loss": None, "hidden": None}
    run = spotsafe.Run(args.store, model=model, state=S)  # spotsafe
    try:
        for epoch in run.epochs(args.epochs, start=1):  # spotsafe
            for batch, i in run.enumerate(range(0, train_data.size(0) - 1, args.bptt)):  # spotsafe
                x, y = get_batch(train_data, i, args.bptt)
                hidden = S["hidden"] if S["hidden"] is not None else model.init_hidden(args.batch_size)
                model.zero_grad()
                out, hidden = model(x, hidden)
                S["hidden"] = tuple(h.detach() for h in hidden)  # carried into the next batch
                loss = nn.functional.cross_entropy(out, y)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(p.grad, alpha=-S["lr"])
                if batch % 10 == 0:
                    print(f"epoch {epoch} batch {batch}: lr {S['lr']:.2f} loss {loss.item():.3f}", flush=True)
                run.step(loss=loss.item())  # spotsafe
            S["hidden"] = None  # each epoch starts from a zero state
            val_loss = evaluate(model, val_data, args.bptt, args.batch_size)
            print(f"end of epoch {epoch}: valid loss {val_loss:.3f}, ppl {math.exp(val_loss):.2f}", flush=True)
            if S["best_val_loss"] is None or val_loss < S["best_val_loss"]:
                S["best_val_loss"] = val_loss
            else:
                S["lr"] /= 4.0  # anneal when the validation loss stops improving
    except KeyboardInterrupt:
        print("exiting from training early", flush=True)
    run.finish()  # spotsafe
    test_loss = evaluate(model, test_data, args.bptt, args.batch_size)
    digest = hashlib.sha256()
    for v in model.state_dict().values():
        digest.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    print(
        f"done: {run.step_count} steps, lr {S['lr']}, best valid loss {S['best_val_loss']!r}, test loss "
        f"{test_loss!r}, fingerprint {digest.hexdigest()[:16]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
