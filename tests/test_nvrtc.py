"""libnvrtc through ctypes: found, loaded once by racing threads, its errors clear, and its
absence an ImportError the runtime answers with cupy."""

import threading

import pytest

from fgcupy.jit import KernelCompileError, nvrtc
from fgcupy.jit.compile import compile_cubin
from fgcupy.jit.plan_spec import LaunchOrderSpec

from .needs import needs_nvrtc

SOURCE = 'namespace fg { template <int N> __global__ void fill(float *x) { x[threadIdx.x] = N; } }\n'


@pytest.fixture
def unloaded(monkeypatch):
    monkeypatch.setattr(nvrtc, "_lib", None)
    return nvrtc


def test_missing_library_is_an_import_error_naming_the_wheel(unloaded, monkeypatch):
    monkeypatch.setattr(nvrtc, "_wheel_paths", lambda: [])
    monkeypatch.setattr(nvrtc, "_pathfinder_path", lambda: None)
    monkeypatch.setattr(nvrtc, "SYSTEM_NAME", "libnvrtc-that-is-not-there.so.13")
    with pytest.raises(ImportError, match="nvidia-cuda-nvrtc") as err:
        nvrtc.library()
    assert "libnvrtc-that-is-not-there" in str(err.value)
    assert not nvrtc.available()




@needs_nvrtc
def test_compiles_a_template_to_a_cubin_with_its_lowered_name():
    ok, log, lowered, cubin = nvrtc.compile_program(SOURCE, "fill.cu", "fg::fill<7>", ["-arch=sm_80", "-std=c++17"])
    assert ok and cubin[:4] == b"\x7fELF"
    assert lowered.startswith("_Z") and "fill" in lowered
    assert nvrtc.version() >= (13, 0)


@needs_nvrtc
def test_a_failed_compile_returns_the_compiler_log():
    ok, log, lowered, cubin = nvrtc.compile_program(SOURCE.replace("= N;", "= M;"), "fill.cu", "fg::fill<7>",
                                                    ["-arch=sm_80"])
    assert not ok and "identifier \"M\" is undefined" in log and lowered == "" and cubin == b""


@needs_nvrtc
def test_compile_cubin_raises_with_the_log_of_a_broken_spec(monkeypatch):
    monkeypatch.setattr("fgcupy.jit.compile.kernel_source", lambda spec: "this is not C++;")
    with pytest.raises(KernelCompileError, match="launch_order") as err:
        compile_cubin(LaunchOrderSpec(), "sm_80")
    assert "error" in err.value.nvrtc_log


@needs_nvrtc
def test_threads_racing_to_the_first_compile_load_the_library_once(unloaded, monkeypatch):
    opened = []
    real_open = nvrtc._open
    monkeypatch.setattr(nvrtc, "_open", lambda path: opened.append(path) or real_open(path))
    results = []

    def compile_one(n):
        results.append(nvrtc.compile_program(SOURCE, "fill.cu", f"fg::fill<{n}>", ["-arch=sm_80"])[0])

    threads = [threading.Thread(target=compile_one, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4 and len(opened) == 1
