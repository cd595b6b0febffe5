"""Round trips of every kind of state through spotsafe.state (no store involved)."""

from __future__ import annotations

import collections
import enum
import random
import types
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch

from spotsafe.checkpoint.staging import StagingBuffer, stage
from spotsafe.errors import StateError
from spotsafe.state import MAX_DEPTH, RNGState, blob_from_buffer, flatten, to_plain, unflatten


def roundtrip(state: Any, **kw: Any) -> Any:
    snap = stage(flatten(state), StagingBuffer(pin=False))
    data = memoryview(bytearray(b"".join(snap.parts)))  # what a file read would give
    zero_copy = stage(flatten(state), StagingBuffer(pin=False), copy=False)
    assert b"".join(zero_copy.parts) == bytes(data)  # the sync path writes the very same bytes
    return unflatten(snap.description, lambda i: blob_from_buffer(data, snap.blobs[i], "mem"), **kw)


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)


ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.complex32,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
]


def make(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    n = int(torch.tensor(shape).prod()) if shape else 1
    itemsize = dtype.itemsize
    bytes_ = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        bytes_ = bytes_ % 2
    return bytes_.view(dtype).reshape(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(dtype: torch.dtype) -> None:
    t = make(dtype)
    zero_d = make(dtype, ())
    out = roundtrip({"t": t, "z": zero_d, "empty": torch.empty(0, 4, dtype=dtype)})
    assert same(out["t"], t)
    assert same(out["z"], zero_d)
    assert out["z"].dim() == 0
    assert out["empty"].shape == (0, 4)
    assert out["empty"].dtype == dtype


def test_views_ties_and_strides_survive() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "base": base,
        "t": base.t(),  # non-contiguous view
        "slice": base[1:4, ::3],
        "row": base[5],
        "other": {"again": base},  # the same tensor under two names
        "bytes": base.view(torch.uint8),  # another dtype on the same storage
    }
    out = roundtrip(state)
    ptr = out["base"].untyped_storage().data_ptr()
    for key in ("t", "slice", "row", "bytes"):
        assert out[key].untyped_storage().data_ptr() == ptr, f"{key}"
    assert out["other"]["again"].untyped_storage().data_ptr() == ptr
    assert out["t"].stride() == (1, 10)
    assert out["slice"].stride() == (30, 3) or out["slice"].stride() == base[1:4, ::3].stride()
    assert torch.equal(out["slice"], base[1:4, ::3])
    assert torch.equal(out["t"], base.t())
    # still tied: a write through one name shows through the other
    out["base"][5, 0] = -1.0
    assert out["row"][0].item() == -1.0
    assert out["t"][0, 5].item() == -1.0


def test_small_view_of_a_large_storage_saves_only_its_range() -> None:
    big = torch.zeros(1_000_000)
    flat = flatten({"v": big[10:20]})
    assert flat.nbytes < 200
    assert torch.equal(roundtrip({"v": big[10:20]})["v"], big[10:20])


def test_conj_view_and_parameters() -> None:
    z = torch.randn(4, dtype=torch.complex64)
    p = torch.nn.Parameter(torch.randn(3))
    out = roundtrip({"zc": z.conj(), "p": p, "g": torch.ones(2, requires_grad=True)})
    assert torch.equal(out["zc"], z.conj())
    assert isinstance(out["p"], torch.nn.Parameter)
    assert out["p"].requires_grad
    assert torch.equal(out["p"].detach(), p.detach())
    assert out["g"].requires_grad


def test_plain_values_keep_their_types() -> None:
    state = {
        "none": None,
        "t": True,
        "f": False,
        "i": 2**70,
        "neg": -3,
        "x": 0.1,
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": -float("inf"),
        "negzero": -0.0,
        "s": "héllo",
        "list": [1, [2, 3], (4, 5)],
        "tuple": (1, "a", None),
        "empty": {},
        "elist": [],
        "etuple": (),
        "intkeys": {0: "a", 1: "b", -2: "c"},
        "mixed": {1: 1, "1": 2, 1.5: 3, None: 4, (1, 2): 6},
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "T": "a key named T",
        "nested": {"T": "tensor", "id": 0},  # looks like a tag, is data
        "od": OrderedDict([("b", 1), ("a", 2)]),
        "np": np.arange(6, dtype=np.int32).reshape(2, 3),
        "npf": np.float64(1.5),
        "npi": np.int64(7),
    }
    out = roundtrip(state)
    for key in (
        "none",
        "t",
        "f",
        "i",
        "neg",
        "x",
        "s",
        "list",
        "tuple",
        "empty",
        "elist",
        "etuple",
        "intkeys",
        "size",
        "dtype",
        "device",
        "T",
        "nested",
    ):
        assert out[key] == state[key], f"{key}"
        assert type(out[key]) is type(state[key]), f"{key}"
    assert out["mixed"] == state["mixed"]
    assert [type(k) for k in out["mixed"]] == [type(k) for k in state["mixed"]]
    assert out["nan"] != out["nan"]
    assert out["inf"] == float("inf") and out["ninf"] == -float("inf")
    assert str(out["negzero"]) == "-0.0"
    assert type(out["list"][2]) is tuple
    assert type(out["od"]) is OrderedDict and list(out["od"]) == ["b", "a"]
    assert isinstance(out["np"], np.ndarray) and out["np"].dtype == np.int32
    assert (out["np"] == state["np"]).all()
    assert type(out["npf"]) is np.float64 and out["npf"] == 1.5
    assert type(out["npi"]) is np.int64 and out["npi"] == 7


class Weird:
    pass


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"optimizer": {"state": {3: {"foo": Weird()}}}}, "optimizer.state.3.foo"),
        ({"a": [1, {"b": object()}]}, "a.1.b"),
        ({"fn": lambda x: x}, "fn"),
        ({"s": {1, 2}}, "s"),
        ({"b": b"bytes"}, "b"),
        ({"k": {Weird(): 1}}, "k"),
        ({"sparse": torch.eye(3).to_sparse()}, "sparse"),
        ({"meta": torch.empty(3, device="meta")}, "meta"),
    ],
)
def test_unsupported_values_name_their_key_path(state: dict[str, Any], path: str) -> None:
    with pytest.raises(StateError) as e:
        flatten(state)
    assert str(e.value).startswith(path + ":") or f"{path}:" in str(e.value)


def test_module_state_dict_keeps_metadata_and_loads_strict() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model(torch.randn(16, 4))  # updates BatchNorm running stats
    out = roundtrip({"model": model})
    sd = model.state_dict()
    assert list(out["model"]) == list(sd)
    assert out["model"]._metadata == sd._metadata  # type: ignore[attr-defined]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    fresh.load_state_dict(out["model"], strict=True)
    for (k, a), b in zip(sd.items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{k}"


def tied_model() -> torch.nn.Module:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # weight tying, as in language models
    return torch.nn.ModuleDict({"emb": emb, "head": head})


def test_tied_weights_stay_tied_after_load() -> None:
    model = tied_model()
    out = roundtrip({"model": model})
    assert out["model"]["emb.weight"].data_ptr() == out["model"]["head.weight"].data_ptr()


def train_steps(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: Any, n: int, seed: int
) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(loss.item())
    return losses


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7),
}


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", ["Adam", "SGD"])
def test_training_resumes_identically(opt_name: str, sched_name: str) -> None:
    def build() -> tuple[Any, Any, Any, Any]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
        if opt_name == "Adam":
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sched = SCHEDULERS[sched_name](opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        return model, opt, sched, scaler

    model, opt, sched, scaler = build()
    train_steps(model, opt, sched, scaler, 5, seed=1)
    out = roundtrip({"model": model, "opt": opt, "sched": sched, "scaler": scaler})
    reference = train_steps(model, opt, sched, scaler, 5, seed=2)

    model2, opt2, sched2, scaler2 = build()
    model2.load_state_dict(out["model"])
    opt2.load_state_dict(out["opt"])
    sched2.load_state_dict(out["sched"])
    scaler2.load_state_dict(out["scaler"])
    resumed = train_steps(model2, opt2, sched2, scaler2, 5, seed=2)
    assert resumed == reference
    assert scaler2.get_scale() == scaler.get_scale()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_optimizer_state_keeps_int_keys() -> None:
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    out = roundtrip({"opt": opt})
    assert sorted(out["opt"]["state"]) == [0, 1]
    assert out["opt"]["param_groups"][0]["params"] == [0, 1]


def test_lambda_scheduler_fails_clearly() -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)

    class Warmup:  # a callable object: LambdaLR keeps its __dict__ in the state dict
        def __init__(self) -> None:
            self.fn = lambda step: 0.5

        def __call__(self, step: int) -> float:
            return 0.5

    plain_lambda = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    flatten({"sched": plain_lambda})  # torch drops plain lambdas from the state dict: fine
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Warmup())
    with pytest.raises(StateError, match=r"sched\.lr_lambdas\.0\.fn: a callable"):
        flatten({"sched": sched})


def test_rng_state_continues_every_generator() -> None:
    rng = RNGState()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # gauss caches
    out = roundtrip({"rng": rng})
    expected = (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    RNGState().load_state_dict(out["rng"])
    got = (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )
    assert got == expected


def test_to_plain_calls_state_dict_recursively() -> None:
    lin = torch.nn.Linear(2, 2)
    plain = to_plain({"models": [lin, {"inner": lin}]})
    assert set(plain["models"][0]) == {"weight", "bias"}
    assert set(plain["models"][1]["inner"]) == {"weight", "bias"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_tensors_come_back_where_asked() -> None:
    t = torch.randn(4, device="cuda")
    out = roundtrip({"t": t, "v": t[1:]})
    assert out["t"].device.type == "cuda"
    assert torch.equal(out["t"], t)
    cpu = roundtrip({"t": t}, map_location="cpu")
    assert cpu["t"].device.type == "cpu"


# ----------------------------------------------------------------------------- exact round trip or StateError


def test_numpy_zero_d_and_scalars_keep_their_shape_and_type() -> None:
    state = {
        "zero_d": np.array(3.5),
        "zero_d_int": np.array(7, dtype=np.int16),
        "strided": np.arange(12).reshape(3, 4)[:, ::2],
        "scalar": np.float32(1.5),
        "flag": np.bool_(True),
    }
    out = roundtrip(state)
    assert out["zero_d"].shape == () and out["zero_d"].dtype == np.float64 and float(out["zero_d"]) == 3.5
    assert out["zero_d_int"].shape == () and out["zero_d_int"].dtype == np.int16
    assert out["strided"].tolist() == state["strided"].tolist()
    assert type(out["scalar"]) is np.float32 and type(out["flag"]) is np.bool_


def test_huge_ints_round_trip() -> None:
    big = 7**20_000  # ~17,000 decimal digits: more than Python prints or JSON reads as decimal
    state = {"big": big, "neg": -big, "keys": {big: "k"}, "small": 2**64}
    out = roundtrip(state)
    assert out == state


class Color(enum.IntEnum):
    RED = 1


class Mode(str, enum.Enum):
    TRAIN = "train"


class MyInt(int):
    pass


class MyList(list):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (collections.defaultdict(list, a=[1]), "defaultdict"),
        (collections.Counter("aab"), "Counter"),
        (types.MappingProxyType({"a": 1}), "mappingproxy"),
        (Color.RED, "enum member"),
        (Mode.TRAIN, "enum member"),
        (MyInt(3), "plain int"),
        (MyList([1]), "MyList"),
        (collections.namedtuple("P", "x y")(1, 2), "P"),
        (np.arange(4, dtype=">f4"), "byte order"),
        (np.ma.masked_array([1, 2]), "MaskedArray"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_what_would_not_round_trip_is_refused(value: Any, match: str) -> None:
    with pytest.raises(StateError, match=match):
        flatten({"x": {"inner": value}})


def test_deep_and_self_referencing_nesting_is_a_state_error() -> None:
    deep: Any = 1
    for _ in range(800):
        deep = [deep]
    with pytest.raises(StateError, match="nested deeper than"):
        flatten({"x": deep})
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(StateError, match="cycle"):
        flatten({"x": loop})
    d: dict[str, Any] = {}
    d["self"] = d
    with pytest.raises(StateError, match="cycle"):
        flatten({"x": d})
    ok: Any = 1
    for _ in range(MAX_DEPTH - 2):
        ok = [ok]
    assert roundtrip({"x": ok}) == {"x": ok}  # the limit is generous, and what saves loads


@pytest.mark.parametrize("async_", [True, False])
def test_refused_values_fail_at_save_not_at_wait(tmp_path: Any, async_: bool) -> None:
    from spotsafe.checkpoint.writer import Checkpointer

    loop: list[Any] = []
    loop.append(loop)
    with Checkpointer(tmp_path, async_=async_) as c:
        for bad in (Color.RED, np.arange(3, dtype=">i4"), loop, collections.Counter("ab")):
            with pytest.raises(StateError):
                c.save(1, {"x": bad})
        c.save(2, {"big": 10**5000})  # used to fail late, in the background write
        assert c.wait() is True
        assert c.load(2)["big"] == 10**5000
