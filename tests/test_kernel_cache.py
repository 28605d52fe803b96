"""Compiled kernels on disk (fgcupy.jit.kernel_cache) and the driver loader's CPU-side behaviour."""

import logging

import pytest

from fgcupy.jit import AttentionSpec, driver, kernel_cache
from fgcupy.jit.compile import compile_cubin

pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (test extra) provides NVRTC bindings")

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
