"""Compiled kernels on disk (fgcupy.jit.kernel_cache) and the driver loader's CPU-side behaviour."""

import logging

import pytest

from fgcupy.jit import AttentionSpec, driver, kernel_cache, nvrtc
from fgcupy.jit.compile import compile_cubin

from .needs import needs_nvrtc

pytestmark = needs_nvrtc

SPEC = AttentionSpec("bfloat16", 64, 64)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(tmp_path))
    return tmp_path / "kernels"


def test_a_stored_kernel_loads_back_byte_for_byte(cache_dir):
    assert kernel_cache.load(SPEC, "sm_80") is None
    compiled = compile_cubin(SPEC, "sm_80")
    assert compiled.cubin[:4] == b"\x7fELF" and "sparse_attn_fwd" in compiled.lowered_name
    kernel_cache.store(SPEC, "sm_80", compiled)
    loaded = kernel_cache.load(SPEC, "sm_80")
    assert (loaded.cubin, loaded.lowered_name) == (compiled.cubin, compiled.lowered_name)
    assert [p.parent for p in cache_dir.iterdir()] == [cache_dir]  # one file, no temporaries left
    assert kernel_cache.load(SPEC, "sm_90") is None  # another architecture is another binary


def test_the_file_name_follows_every_input_of_the_binary(cache_dir, monkeypatch):
    from fgcupy.jit import source

    first = kernel_cache.cache_file(SPEC, "sm_80")
    assert first.parent == cache_dir and first.name.startswith(SPEC.name + "-sm_80-")
    assert kernel_cache.cache_file(AttentionSpec("bfloat16", 64, 64, stages=3), "sm_80") != first
    monkeypatch.setattr(kernel_cache, "kernel_source", lambda spec: source.kernel_source(spec) + "\n// edited\n")
    assert kernel_cache.cache_file(SPEC, "sm_80") != first


def test_a_damaged_file_is_ignored(cache_dir, caplog):
    path = kernel_cache.cache_file(SPEC, "sm_80")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"no separator here")
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        assert kernel_cache.load(SPEC, "sm_80") is None
    assert "damaged" in caplog.text


def test_an_unwritable_cache_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        kernel_cache.store(SPEC, "sm_80", compile_cubin(SPEC, "sm_80"))
    assert "cannot write the kernel cache" in caplog.text


def test_driver_availability_is_a_plain_answer():
    assert driver.available() in (True, False)


class _FakeFunction:
    def __init__(self, cubin, lowered_name, device_index, max_dynamic_smem=0):
        self.args = (cubin, lowered_name, device_index, max_dynamic_smem)


@pytest.fixture
def fresh_runtime(monkeypatch, cache_dir):
    from fgcupy.jit import runtime

    monkeypatch.setattr(runtime, "_kernels", {})
    monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_80")
    monkeypatch.setattr(runtime.driver, "available", lambda: True)
    monkeypatch.setattr(runtime.driver, "Function", _FakeFunction)
    return runtime


def test_a_cold_load_compiles_once_then_loads_from_disk(fresh_runtime, monkeypatch):
    runtime = fresh_runtime
    compiles = []
    real = runtime.compile_cubin
    monkeypatch.setattr(runtime, "compile_cubin", lambda spec, arch: compiles.append(arch) or real(spec, arch))
    first = runtime._load(SPEC, 0)
    assert compiles == ["sm_80"] and isinstance(first, runtime.DriverKernel)
    assert first.function.args[1:] == (kernel_cache.load(SPEC, "sm_80").lowered_name, 0, SPEC.smem_bytes)
    second = runtime._load(SPEC, 0)  # a new process: nothing in memory, the file on disk
    assert compiles == ["sm_80"] and second.function.args[0] == first.function.args[0]


def test_without_libnvrtc_or_a_driver_library_cupy_takes_over(fresh_runtime, monkeypatch):
    runtime = fresh_runtime
    monkeypatch.setattr(runtime, "_load_with_cupy", lambda spec, index: ("cupy", spec.name, index))

    def no_nvrtc(spec, arch):
        raise nvrtc.NvrtcUnavailable("libnvrtc (CUDA 13) not found")

    monkeypatch.setattr(runtime, "compile_cubin", no_nvrtc)
    assert runtime._load(SPEC, 1) == ("cupy", SPEC.name, 1)
    monkeypatch.setattr(runtime, "compile_cubin", compile_cubin)
    monkeypatch.setattr(runtime.driver, "available", lambda: False)
    assert runtime._load(SPEC, 0) == ("cupy", SPEC.name, 0)


def test_wgmma_specs_compile_for_their_own_arch(fresh_runtime, monkeypatch):
    from fgcupy.jit import Sm90AttentionSpec

    runtime = fresh_runtime
    seen = []
    monkeypatch.setattr(runtime, "compile_cubin", lambda spec, arch: seen.append(arch) or compile_cubin(SPEC, "sm_80"))
    runtime._load(Sm90AttentionSpec("bfloat16", 64, 64), 0)
    assert seen == ["sm_90a"]
