"""spotsafe.Run with several models and optimizers (a GAN), no state dicts merged by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import spotsafe
from spotsafe.errors import StateMismatch
from spotsafe.state import StateGroup


def _gan() -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
    g, d = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
    return {"G": g, "D": d}, {
        "G": torch.optim.Adam(g.parameters(), lr=1e-3),
        "D": torch.optim.SGD(d.parameters(), lr=1e-2, momentum=0.9),
    }


def _train(models: dict[str, torch.nn.Module], opts: dict[str, torch.optim.Optimizer], run: spotsafe.Run, n: int):
    for _ in range(n):
        z = torch.randn(5, 3)
        loss = models["D"](models["G"](z)).mean()
        for o in opts.values():
            o.zero_grad()
        loss.backward()
        for o in opts.values():
            o.step()
        run.step(loss=loss.detach())


def test_two_models_and_two_optimizers_resume_bit_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models, opts = _gan()
    run = spotsafe.Run(str(tmp_path / "a"), model=models, optimizer=opts, every_steps=5, watch=False, report_every=None)
    _train(models, opts, run, 10)
    run.finish()
    expected = {k: {n: p.clone() for n, p in m.state_dict().items()} for k, m in models.items()}
    momentum = opts["D"].state_dict()["state"][0]["momentum_buffer"].clone()

    torch.manual_seed(0)
    models, opts = _gan()
    run = spotsafe.Run(str(tmp_path / "b"), model=models, optimizer=opts, every_steps=5, watch=False, report_every=None)
    _train(models, opts, run, 5)
    run.close()  # the "interruption": step 5 is saved
    fresh_models, fresh_opts = _gan()  # new objects, other weights: all must come from the checkpoint
    run = spotsafe.Run(
        str(tmp_path / "b"), model=fresh_models, optimizer=fresh_opts, every_steps=5, watch=False, report_every=None
    )
    assert run.step_count == 5
    _train(fresh_models, fresh_opts, run, 5)
    run.finish()
    for k, m in fresh_models.items():
        for n, p in m.state_dict().items():
            assert torch.equal(p, expected[k][n]), f"{(k, n)}"
    assert torch.equal(fresh_opts["D"].state_dict()["state"][0]["momentum_buffer"], momentum)
    assert fresh_opts["G"].state_dict()["state"][0]["step"] == 10  # Adam's step count came back too


def test_a_checkpoint_of_other_models_is_refused_with_the_names(tmp_path: Path) -> None:
    models, opts = _gan()
    with spotsafe.Run(str(tmp_path), model=models, optimizer=opts, watch=False, report_every=None) as run:
        run.save()
    extra = {**models, "E": torch.nn.Linear(1, 1)}
    with pytest.raises(
        StateMismatch, match=r"model: the checkpoint holds \['D', 'G'\], this run has \['D', 'E', 'G'\]"
    ):
        spotsafe.Run(str(tmp_path), model=extra, optimizer=opts, watch=False, report_every=None)


def test_groups_check_what_they_are_given() -> None:
    g = StateGroup("model", [torch.nn.Linear(1, 1), torch.nn.Linear(1, 2)])
    assert sorted(g.state_dict()) == ["0", "1"]
    with pytest.raises(ValueError, match="model: an empty mapping"):
        StateGroup("model", {})
    with pytest.raises(TypeError, match=r"optimizer\['x'\]: int has no state_dict"):
        StateGroup("optimizer", {"x": 3})
