"""The one launch ABI: Python and C++ agree on every parameter struct's layout (no GPU needed)."""

import importlib
import pkgutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fgcupy.jit
from fgcupy.jit import nvrtc
from fgcupy.jit.launch import KINDS, ParamStruct

from .needs import needs_nvrtc


def _every_struct() -> list:
    """Every parameter struct defined in a module of fgcupy.jit, once each."""
    found = {}
    for info in pkgutil.iter_modules(fgcupy.jit.__path__):
        module = importlib.import_module(f"fgcupy.jit.{info.name}")
        for value in vars(module).values():
            if isinstance(value, ParamStruct):
                found[id(value)] = value
    return list(found.values())


STRUCTS = _every_struct()


def _nvrtc_accepts(code: str) -> tuple:
    return nvrtc.accepts(code, ["-std=c++17", "-arch=compute_80"])


@needs_nvrtc
@pytest.mark.parametrize("struct", STRUCTS, ids=lambda s: f"{s.name}-{len(s.fields)}")
def test_cpp_layout_matches_numpy(struct):
    ok, log = _nvrtc_accepts(struct.cpp() + struct.layout_checks())
    assert ok, log


@needs_nvrtc
def test_a_wrong_layout_is_caught():
    """The check can fail: a claimed size that the compiler does not give."""
    struct = ParamStruct("Odd", (("a", "i32"), ("b", "i64")))
    assert struct.dtype.itemsize == 16
    wrong = struct.layout_checks().replace("== 16", "== 12")
    ok, _ = _nvrtc_accepts(struct.cpp() + wrong)
    assert not ok


@pytest.mark.gpu
@pytest.mark.parametrize("struct", STRUCTS, ids=lambda s: f"{s.name}-{len(s.fields)}")
def test_every_field_offset_matches_on_the_gpu(struct):
    import cupy

    kernel = cupy.RawModule(code=struct.offsets_kernel()).get_function("offsets")
    out = cupy.zeros(len(struct.fields), dtype=cupy.int64)
    kernel((1,), (1,), (out,))
    assert out.get().tolist() == struct.offsets


@needs_nvrtc
def test_tensor_maps_sit_on_64_byte_boundaries():
    struct = ParamStruct("M", (("n", "i32"), ("map", "tmap"), ("m", "i32")))
    assert struct.offsets == [0, 64, 192] and struct.dtype.itemsize == 256 and struct.alignment == 64
    packed = struct.pack(n=1, map=bytes(range(128)), m=2).tobytes()
    assert packed[64:192] == bytes(range(128)) and struct.pack(n=1, map=None, m=2).tobytes()[64:192] == bytes(128)
    ok, log = _nvrtc_accepts(struct.cpp() + struct.layout_checks())
    assert ok, log


def test_pack_needs_every_field_and_no_other():
    struct = ParamStruct("P", (("x", "in"), ("n", "i32"), ("s", "f32")))
    with pytest.raises(TypeError, match=r"missing fields \['s'\]"):
        struct.pack(x=None, n=1)
    with pytest.raises(TypeError, match=r"unknown fields \['y'\]"):
        struct.pack(x=None, n=1, s=0.5, y=2)
    with pytest.raises(TypeError, match=r"missing fields \['s'\], unknown fields \['y'\]"):
        struct.pack(x=None, n=1, y=2)
    packed = struct.pack(x=None, n=7, s=0.5)
    assert packed["n"] == 7 and packed["x"] == 0 and np.float32(packed["s"]) == np.float32(0.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        ParamStruct("Q", (("x", "double"),))


def test_pack_takes_pointers_of_cuda_tensors_on_one_device_only():
    """A host tensor's address (or another GPU's) would be read by the kernel as this GPU's memory."""

    class OnGpu:
        def __init__(self, index):
            self.device = torch.device("cuda", index)

        def data_ptr(self):
            return 4096

    struct = ParamStruct("P", (("x", "in"), ("y", "out"), ("n", "i32")))
    with pytest.raises(TypeError, match=r"P.x must be a CUDA tensor \(or None\), got a tensor on cpu"):
        struct.pack(x=torch.zeros(2), y=None, n=1)
    with pytest.raises(TypeError, match=r"P.y must be a CUDA tensor \(or None\), got int"):
        struct.pack(x=None, y=4096, n=1)
    with pytest.raises(ValueError, match=r"P.y is on cuda:1; the struct's other tensors are on cuda:0"):
        struct.pack(x=OnGpu(0), y=OnGpu(1), n=1)
    packed = struct.pack(x=OnGpu(0), y=OnGpu(0), n=1)
    assert packed["x"] == packed["y"] == 4096


def test_a_grid_past_cudas_limits_is_named_before_any_launch():
    from fgcupy.jit.launch import launch
    from fgcupy.jit.plan_spec import LaunchOrderSpec

    params = np.zeros((), LaunchOrderSpec().params.dtype)[()]
    for grid in ((1, 65536, 1), (1, 1, 65536), (2**31, 1, 1)):
        with pytest.raises(ValueError, match=r"exceeds CUDA's limits"):
            launch(LaunchOrderSpec(), None, grid, params)


def test_pack_refuses_values_its_fields_would_wrap_truncate_or_round():
    struct = ParamStruct("P", (("n", "i32"), ("s", "f32"), ("m", "tmap")))
    bad = [({"n": 2**31}, ValueError, r"P.n = 2147483648 is outside i32's range"),
           ({"n": torch.tensor(2**31)}, ValueError, r"P.n = 2147483648 is outside"),
           ({"n": 3.7}, TypeError, r"P.n must be an int"),
           ({"s": None}, TypeError, r"P.s must be a number"),
           ({"s": "1.5"}, TypeError, r"P.s must be a number"),
           ({"s": float("nan")}, ValueError, r"P.s must be a float32 number"),
           ({"s": 1e39}, ValueError, r"P.s must be a float32 number"),
           ({"m": bytes(64)}, ValueError, r"P.m: a tensor map is 128 bytes")]
    for change, error, message in bad:
        with pytest.raises(error, match=message):
            struct.pack(**{"n": 1, "s": 0.5, "m": None, **change})
    packed = struct.pack(n=np.int64(-5), s=float("-inf"), m=None)  # an explicit infinity is a value
    assert packed["n"] == -5 and packed["s"] == -np.inf
    assert struct.pack(n=4.0, s=torch.tensor(0.25), m=None)["n"] == 4  # an integral float is its int


def test_a_grid_or_shared_memory_below_one_is_named_before_any_launch():
    from fgcupy.jit.launch import launch
    from fgcupy.jit.plan_spec import LaunchOrderSpec

    params = np.zeros((), LaunchOrderSpec().params.dtype)[()]
    for grid, shared in (((0, 1, 1), None), ((4, -2, 1), None), ((1, 1, 1), -1)):
        with pytest.raises(ValueError, match=r"must be positive"):
            launch(LaunchOrderSpec(), None, grid, params, shared)


def test_a_struct_or_grid_the_kernel_cannot_take_is_named_before_any_launch():
    from fgcupy.jit.launch import launch
    from fgcupy.jit.plan_spec import LaunchOrderSpec
    from fgcupy.jit.spec import AttentionSpec

    spec = LaunchOrderSpec()
    params = np.zeros((), spec.params.dtype)[()]
    other = np.zeros((), AttentionSpec("bfloat16", 128).params.dtype)[()]
    for bad in (None, 7, other):
        with pytest.raises(TypeError, match=r"params must be a OrderParams packed by spec.params.pack"):
            launch(spec, None, (1,), bad)
    for grid in ((), (1, 1, 1, 70000), (2.5,), (True,), 4):
        with pytest.raises(ValueError, match=r"grid must be a tuple of one to three ints"):
            launch(spec, None, grid, params)


class _OnGpu:
    """What pack reads of a CUDA tensor: its device and address."""

    def __init__(self, address: int):
        self.device = torch.device("cuda", 0)
        self.address = address

    def data_ptr(self) -> int:
        return self.address


def _field_values(kind: str):
    if kind in ("in", "out"):
        return st.one_of(st.none(), st.integers(0, 2**64 - 1).map(_OnGpu))
    if kind == "tmap":
        return st.one_of(st.none(), st.binary(min_size=128, max_size=128))
    if kind == "f32":
        return st.floats(width=32, allow_nan=False)
    info = np.iinfo(KINDS[kind][1])
    return st.integers(int(info.min), int(info.max))


def _packed_field_by_field(struct: ParamStruct, values: dict) -> bytes:
    """The struct's bytes, each field set alone into a zeroed numpy value."""
    packed = np.zeros((), dtype=struct.dtype)
    for field, kind in struct.fields:
        value = values[field]
        if kind in ("in", "out"):
            value = 0 if value is None else value.data_ptr()
        elif kind == "tmap":
            value = np.void(bytes(128) if value is None else value)
        packed[field] = value
    return packed.tobytes()


@pytest.mark.parametrize("struct", STRUCTS, ids=lambda s: f"{s.name}-{len(s.fields)}")
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_pack_writes_each_field_where_the_struct_has_it(struct, data):
    """pack builds a struct in one step: its bytes are those of setting each field alone."""
    values = {field: data.draw(_field_values(kind), label=field) for field, kind in struct.fields}
    assert struct.pack(**values).tobytes() == _packed_field_by_field(struct, values)


def test_every_kernel_struct_is_checked():
    from fgcupy.jit.score_spec import SCORE_PARAMS
    from fgcupy.jit.spec import ATTN_PARAMS, ATTN_TMA_PARAMS

    names = {s.name for s in STRUCTS}
    assert {"ScoreParams", "AttnParams", "SelectParams", "EmitParams", "DilateParams", "DilateInPlaceParams",
            "AdaptiveRowsParams", "UnionParams", "OrderParams", "E4m3SumsqParams", "E4m3RoundParams", "PackParams"} <= names
    assert all(any(s is known for s in STRUCTS) for known in (SCORE_PARAMS, ATTN_PARAMS, ATTN_TMA_PARAMS))


def test_a_tensor_map_is_any_buffer_of_128_bytes():
    """Counted in bytes, whatever the buffer's items: 128 int64 are 1,024 bytes, not a map."""
    struct = ParamStruct("P", (("m", "tmap"),))
    descriptor = bytes(range(128))
    for same in (descriptor, bytearray(descriptor), np.void(descriptor), np.frombuffer(descriptor, np.uint64)):
        assert struct.pack(m=same).tobytes() == descriptor
    for wrong, size in ((np.zeros(128, np.int64), 1024), (bytes(129), 129), (bytes(64), 64)):
        with pytest.raises(ValueError, match=f"P.m: a tensor map is 128 bytes, got {size}"):
            struct.pack(m=wrong)
