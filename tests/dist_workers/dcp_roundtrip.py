"""FSDP2 (fully_shard) state through DCP into a spotsafe store, committed last, loaded back.

argv: OUT_DIR STORE_DIR
Rank 0 also writes the full (unsharded) tensors it expects, for the test's
world-size-1 reshard load.
"""

from __future__ import annotations

import sys

import torch
from _common import finish, init, manifest_commit, manifest_files, out_dir, report
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from spotsafe.distributed.context import DistContext
from spotsafe.distributed.dcp import load_sharded, save_sharded
from spotsafe.storage.local import LocalStore


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def full(tree: object) -> object:
    if isinstance(tree, dict):
        return {k: full(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [full(v) for v in tree]
    if hasattr(tree, "full_tensor"):
        return tree.full_tensor()
    return tree


def main() -> None:
    rank, world = init()
    ctx = DistContext.detect()
    assert ctx is not None
    store = LocalStore(sys.argv[2])
    model, opt = build(0)
    for _ in range(2):
        torch.manual_seed(100 + rank)
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    expected = full({"model": msd, "optim": osd})
    directory = "step-000000000002"
    files = save_sharded(
        {"model": msd, "optim": osd},
        store,
        directory,
        ctx=ctx,
        commit=manifest_commit(store, directory, 2, world),
        timeout=30,
    )

    # a differently initialised replica, loaded from the store
    model2, opt2 = build(1)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    load_sharded(state, store, directory, ctx=ctx, files=manifest_files(store, directory))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd3, osd3 = get_state_dict(model2, opt2)
    got = full({"model": msd3, "optim": osd3})

    def same(a: object, b: object) -> bool:
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        return a == b

    if rank == 0:
        torch.save(expected, out_dir() / "expected.pt")
    report(
        f"dcp-{rank}.json",
        {
            "rank": rank,
            "equal": same(expected, got),
            "files": sorted(f.path for f in files),
            "local_shape": list(msd["0.weight"].to_local().shape),
        },
    )
    finish()


if __name__ == "__main__":
    main()
