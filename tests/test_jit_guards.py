"""The kernel cache's file guards, the compile options and errors, parameter packing at its
limits, background compiles and the timing helper's warm-up and lead (fgcupy.jit, fgcupy.timing,
fgcupy.paths). CPU only; CUDA events and the GPU are mocked where timing is checked."""

import math
import fnmatch
import logging
import os
import pickle
import stat
import time

import numpy as np
import pytest
import torch

from fgcupy import paths
from fgcupy.jit import AttentionSpec, kernel_cache
from fgcupy.jit.compile import CompiledKernel, KernelCompileError, compile_options

KILL_SPEC = AttentionSpec("bfloat16", 64, 64)
FAKE_BINARY = CompiledKernel(b"\x7fELF not a real cubin", "sparse_attn_fwd_lowered", "")


@pytest.fixture
def kill_cache_dir(tmp_path, monkeypatch):
    """A fresh cache folder under umask 022 (the kernels' folder inside it)."""
    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(tmp_path))
    old = os.umask(0o022)
    yield tmp_path / "kernels"
    os.umask(old)


@pytest.fixture
def quiet_runtime(monkeypatch, kill_cache_dir):
    """jit.runtime with empty tables, an sm_80 device and the driver present (nothing loaded)."""
    from fgcupy.jit import runtime

    for table in ("_kernels", "_failed_in_background", "_compiled_in_background", "_key_locks"):
        monkeypatch.setattr(runtime, table, {})
    for table in ("_loading_in_background", "_compile_failed", "_threads"):
        monkeypatch.setattr(runtime, table, set())
    monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_80")
    monkeypatch.setattr(runtime.driver, "available", lambda: True)
    return runtime


# ---------------------------------------------------------------------------------------------
# kernel cache files
# ---------------------------------------------------------------------------------------------
def test_a_failed_cache_write_leaves_no_temporary_behind(kill_cache_dir, monkeypatch, caplog):
    """A write that fails before its rename (a full disk, a read-only target) deletes its
    temporary file at once rather than leaving it for an hour-later sweep."""
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        kernel_cache.store(KILL_SPEC, "sm_80", FAKE_BINARY)
    assert "cannot write the kernel cache" in caplog.text
    assert list(kill_cache_dir.iterdir()) == []


def test_cache_writes_go_through_a_temporary_the_sweep_recognises(kill_cache_dir, monkeypatch):
    """A writer killed between creating its temporary and renaming it leaves that file behind:
    only a name the sweep's pattern matches is ever cleaned up."""
    renamed, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(os.path.basename(src)) or real(src, dst))
    kernel_cache.store(KILL_SPEC, "sm_80", FAKE_BINARY)
    assert len(renamed) == 1 and fnmatch.fnmatch(renamed[0], ".tmp-*")
    assert kernel_cache.load(KILL_SPEC, "sm_80").cubin == FAKE_BINARY.cubin


def test_a_symlink_at_a_kernel_files_path_is_not_followed(kill_cache_dir, caplog):
    """Even one pointing at an intact file of this user's: the link could be swapped for one to
    another user's file between checks."""
    kernel_cache.store(KILL_SPEC, "sm_80", FAKE_BINARY)
    path = kernel_cache.cache_file(KILL_SPEC, "sm_80")
    target = path.with_name("elsewhere.bin")
    os.replace(path, target)
    os.symlink(target, path)
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        assert kernel_cache.load(KILL_SPEC, "sm_80") is None
    assert "cannot read the kernel cache file" in caplog.text


def test_a_kernel_file_others_but_not_the_group_may_write_is_not_run(kill_cache_dir, caplog):
    kernel_cache.store(KILL_SPEC, "sm_80", FAKE_BINARY)
    path = kernel_cache.cache_file(KILL_SPEC, "sm_80")
    os.chmod(path, 0o646)
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        assert kernel_cache.load(KILL_SPEC, "sm_80") is None
    assert "writable by other users (mode 646)" in caplog.text


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="needs POSIX owners")
def test_a_file_owned_by_another_user_is_refused_whoever_runs_the_tests(tmp_path, monkeypatch):
    path = tmp_path / "table"
    path.write_bytes(b"data")
    os.chmod(path, 0o644)
    if os.getuid() == 0:  # root may hand the file to another user
        os.chown(path, 4321, 4321)
        owner = 4321
    else:  # anyone else becomes another user
        owner = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: owner + 4242)
    with pytest.raises(PermissionError, match=f"owned by user {owner}"):
        paths.read_own_file(path, 100)


def test_a_file_of_exactly_the_size_limit_is_read(tmp_path):
    path = tmp_path / "exact"
    path.write_bytes(b"x" * 100)
    os.chmod(path, 0o644)
    assert paths.read_own_file(path, 100) == b"x" * 100
    with pytest.raises(paths.FileTooLarge, match="larger than 99 bytes"):
        paths.read_own_file(path, 99)


# ---------------------------------------------------------------------------------------------
# the temporary fallback folder
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fallback_in_tmp(tmp_path, monkeypatch):
    """The temporary fallback (fgcupy-cache-<uid>) inside tmp_path, under umask 022."""
    monkeypatch.setattr(paths.tempfile, "gettempdir", lambda: str(tmp_path))
    old = os.umask(0o022)
    yield paths._temporary_root()
    os.umask(old)


def test_the_temporary_fallback_is_made_private_when_a_folder_inside_it_is_made(fallback_in_tmp):
    """Its name is predictable: made by this user, it is readable and listable by no other."""
    assert not fallback_in_tmp.exists()
    assert paths.untrusted_folder(fallback_in_tmp / "kernels") is None
    assert (fallback_in_tmp / "kernels").is_dir()
    assert stat.S_IMODE(fallback_in_tmp.stat().st_mode) == 0o700


def test_a_symlinked_temporary_fallback_refuses_the_folders_inside_it(fallback_in_tmp, tmp_path):
    """Another user may plant the predictable fallback as a link to a folder of this user's:
    the kernels folder inside it looks like this user's own, but writes there are refused."""
    victim = tmp_path / "victim"
    victim.mkdir()
    fallback_in_tmp.symlink_to(victim)
    refused = paths.untrusted_folder(fallback_in_tmp / "kernels")
    assert refused is not None and f"{fallback_in_tmp} is a symlink" in refused


# ---------------------------------------------------------------------------------------------
# compiling
# ---------------------------------------------------------------------------------------------
def test_nvrtc_binaries_are_built_with_the_options_cupy_adds():
    """The driver path compiles what cupy.RawModule would (it adds flush-to-zero and device
    code by default): a kernel gives the same numbers whichever path built it."""
    options = compile_options(KILL_SPEC, "sm_80")
    assert "-ftz=true" in options and "--device-as-default-execution-space" in options
    assert options[-1] == "-arch=sm_80"


def test_a_pickled_compile_error_keeps_its_architecture():
    error = pickle.loads(pickle.dumps(KernelCompileError(KILL_SPEC, "error: expected a ';'", "sm_90a")))
    assert error.arch == "sm_90a" and " for sm_90a:" in str(error)


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------
def test_pack_takes_the_ends_of_each_integer_range():
    from fgcupy.jit.launch import ParamStruct

    struct = ParamStruct("Ends", (("a", "i32"), ("b", "i64")))
    for a, b in ((2**31 - 1, 2**63 - 1), (-(2**31), -(2**63))):
        packed = struct.pack(a=a, b=b)
        assert (int(packed["a"]), int(packed["b"])) == (a, b)


def test_the_cpp_struct_declares_fields_in_the_packed_order():
    """numpy packs the fields in this order; the C++ declaration must match it (sizes alone
    cannot tell a reordering apart: the compiler's layout check passes either way)."""
    from fgcupy.jit.launch import ParamStruct
    from fgcupy.jit.spec import ATTN_PARAMS

    for struct in (ATTN_PARAMS, ParamStruct("Mixed", (("x", "in"), ("n", "i32"), ("s", "f32"), ("y", "out")))):
        declared = [line.split()[-1].rstrip(";") for line in struct.cpp().splitlines() if line.startswith("  ")]
        assert declared == [field for field, _ in struct.fields]


@pytest.fixture
def launch_calls(monkeypatch):
    """What launch hands to the kernel (grid and shared memory), the kernel itself mocked."""
    from fgcupy.jit import runtime

    calls = []

    class Kernel:
        def launch(self, device, grid, block, params, shared_mem):
            calls.append((tuple(grid), shared_mem))

    monkeypatch.setattr(runtime, "get_kernel_on", lambda device, spec: Kernel())
    return calls


def test_a_grid_at_cudas_limits_and_no_dynamic_shared_memory_are_launched(launch_calls):
    from fgcupy.jit.launch import GRID_LIMITS, launch
    from fgcupy.jit.plan_spec import LaunchOrderSpec

    spec = LaunchOrderSpec()
    params = np.zeros((), spec.params.dtype)[()]
    launch(spec, None, GRID_LIMITS, params)
    launch(spec, None, (3,), params, 0)
    launch(spec, None, (2, 1), params, 4096)
    assert launch_calls == [(GRID_LIMITS, spec.smem_bytes), ((3,), 0), ((2, 1), 4096)]


# ---------------------------------------------------------------------------------------------
# the runtime's loads
# ---------------------------------------------------------------------------------------------
def test_a_freshly_compiled_binary_the_driver_refuses_is_raised_not_compiled_again(quiet_runtime, monkeypatch):
    """Only a cached file can be stale; a binary NVRTC just made that the driver refuses would be
    refused again: the error is raised after one compile."""
    runtime = quiet_runtime
    compiles = []

    def compile_cubin(spec, arch):
        compiles.append(arch)
        if len(compiles) > 3:
            pytest.fail("compiled again and again")
        return FAKE_BINARY

    def refuses(*args):
        raise runtime.driver.CudaDriverError("CUDA driver call cuModuleLoadData failed: CUDA_ERROR_NO_BINARY_FOR_GPU")

    monkeypatch.setattr(runtime, "compile_cubin", compile_cubin)
    monkeypatch.setattr(runtime.driver, "Function", refuses)
    with pytest.raises(runtime.driver.CudaDriverError, match="NO_BINARY_FOR_GPU"):
        runtime._load(KILL_SPEC, 0)
    assert compiles == ["sm_80"]


def test_a_background_compile_is_written_to_the_disk_cache(quiet_runtime, monkeypatch):
    """A kernel compiled on a thread is cached like any other: the next process loads it."""
    runtime = quiet_runtime
    monkeypatch.setattr(runtime, "compile_cubin", lambda spec, arch: FAKE_BINARY)
    runtime._compile_quietly((KILL_SPEC, 0), "sm_80")
    assert runtime._compiled_in_background[(KILL_SPEC, 0)] == (FAKE_BINARY, False)  # compiled, not read from disk
    assert kernel_cache.load(KILL_SPEC, "sm_80") == CompiledKernel(FAKE_BINARY.cubin, FAKE_BINARY.lowered_name, "")
    runtime._compile_quietly((KILL_SPEC, 0), "sm_80")  # now found on disk, and handed over as such
    assert runtime._compiled_in_background[(KILL_SPEC, 0)] == (kernel_cache.load(KILL_SPEC, "sm_80"), True)


def test_a_kernel_is_at_hand_once_compiled_on_a_thread_or_cached_for_its_own_arch(quiet_runtime, monkeypatch):
    from fgcupy.jit import Sm90AttentionSpec

    runtime = quiet_runtime
    device = torch.device("cuda", 0)
    assert not runtime.kernel_at_hand(device, KILL_SPEC)
    runtime._compiled_in_background[(KILL_SPEC, 0)] = (FAKE_BINARY, False)
    assert runtime.kernel_at_hand(device, KILL_SPEC)
    hopper = Sm90AttentionSpec("bfloat16", 64, 64)
    monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_90")  # the device; the spec compiles for sm_90a
    assert not runtime.kernel_at_hand(device, hopper)
    kernel_cache.store(hopper, "sm_90a", FAKE_BINARY)
    assert runtime.kernel_at_hand(device, hopper)


def test_nothing_is_loaded_on_a_thread_while_a_cuda_graph_is_captured(quiet_runtime, monkeypatch):
    """A module load on a thread could land inside the capture: nothing starts meanwhile."""
    runtime = quiet_runtime
    loads = []
    monkeypatch.setattr(runtime, "_load", lambda spec, index, **options: loads.append(spec) or object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    runtime.load_in_background(torch.device("cuda", 0), KILL_SPEC)
    runtime.wait_for_background(10.0)
    assert loads == [] and not runtime._kernels


# ---------------------------------------------------------------------------------------------
# timing (CUDA events, the GPU's sleep and its clock mocked)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_cuda_clock(monkeypatch):
    """Events whose elapsed times are taken in turn from ``state["elapsed"]``; the lead of every
    ``torch.cuda._sleep`` call lands in ``state["sleeps"]`` (1000 cycles per millisecond)."""
    from fgcupy import timing
    from fgcupy.jit import runtime

    state = {"elapsed": [], "sleeps": []}

    class Event:
        def __init__(self, **options):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return state["elapsed"].pop(0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: state["sleeps"].append(cycles))
    monkeypatch.setattr(timing, "_sleep_cycles_per_ms", lambda index: 1000.0)
    monkeypatch.setattr(runtime, "wait_for_background", lambda *args: False)
    return timing, state


def test_cuda_time_ms_reports_the_median_min_and_max_after_its_warm_up(fake_cuda_clock):
    timing, state = fake_cuda_clock
    calls = []
    state["elapsed"] = [9.0, 1.0, 2.0, 8.0, 3.0]
    result = timing.cuda_time_ms(lambda: calls.append(1), warmup=4, reps=5)
    assert len(calls) == 4 + 5 and not state["sleeps"]
    assert (result["median_ms"], result["min_ms"], result["max_ms"], result["reps"]) == (3.0, 1.0, 9.0, 5)


def test_queued_timing_keeps_the_gpu_busy_for_twice_the_host_time_of_the_last_warm_up(fake_cuda_clock):
    timing, state = fake_cuda_clock
    state["elapsed"] = [1.0] * 3
    result = timing.cuda_time_ms(lambda: time.sleep(0.02), warmup=2, reps=3, queued=True)
    assert len(state["sleeps"]) == 3
    assert all(cycles >= 1000 * (2 * 20 + 1) for cycles in state["sleeps"])  # >= 20 ms of host time each
    assert result["queued"] and result["host_ms"] >= 20


def test_queued_timing_without_warm_up_sizes_its_lead_from_the_host_time_given(fake_cuda_clock):
    timing, state = fake_cuda_clock
    state["elapsed"] = [1.0] * 2
    timing.cuda_time_ms(lambda: None, warmup=0, reps=2, queued=True, host_ms=50.0)
    assert len(state["sleeps"]) == 2 and all(100_000 <= cycles <= 102_000 for cycles in state["sleeps"])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(queued=True, host_ms=-5.0), ValueError, "host_ms must be a finite number"),  # a negative lead: not queued
    (dict(queued=True, host_ms=math.nan), ValueError, "host_ms must be a finite number"),
    (dict(queued=True, host_ms="12"), ValueError, "host_ms must be a finite number"),
    (dict(queued=True, host_ms=True), ValueError, "host_ms must be a finite number"),
    (dict(queued="no"), TypeError, "queued must be a bool"),
    (dict(warmup=-1), ValueError, "warmup must be an int >= 0"),
])
def test_cuda_time_ms_names_a_bad_argument_before_timing(fake_cuda_clock, kwargs, error, message):
    timing, state = fake_cuda_clock
    with pytest.raises(error, match=message):
        timing.cuda_time_ms(lambda: None, **{"warmup": 0, "reps": 2, **kwargs})
    assert state["sleeps"] == []


def test_cuda_time_ms_takes_numpy_counts(fake_cuda_clock):
    timing, state = fake_cuda_clock
    state["elapsed"] = [1.0] * 3
    calls = []
    result = timing.cuda_time_ms(lambda: calls.append(1), warmup=np.int64(1), reps=np.int32(3))
    assert len(calls) == 4 and result["median_ms"] == 1.0


def test_a_struct_listed_as_both_params_and_shared_params_is_defined_once():
    """A spec of a file holding several kernels may list every struct of the file as shared,
    its own included: C++ takes one definition of each."""
    from dataclasses import dataclass

    from fgcupy.jit.plain_spec import PlainKernelSpec
    from fgcupy.jit.score_spec import EMIT_PARAMS, SELECT_PARAMS
    from fgcupy.jit.source import kernel_source

    @dataclass(frozen=True)
    class EveryStructShared(PlainKernelSpec):
        source = "mask_select.cu"
        template = "fg::emit_rows"
        threads = 128
        params = EMIT_PARAMS
        shared_params = (SELECT_PARAMS, EMIT_PARAMS)

    code = kernel_source(EveryStructShared())
    for struct in (EMIT_PARAMS, SELECT_PARAMS):
        assert code.count(f"struct {struct.name} {{") == 1


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="needs POSIX owners")
def test_a_temporary_fallback_another_user_made_is_not_used(fallback_in_tmp, monkeypatch):
    """Another user's folder at the fallback's predictable name, sticky and open to all, is still
    theirs to empty or swap: nothing is written there."""
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 4242)
    theirs = paths._temporary_root()  # this (pretended) user's fallback, made by the real one
    theirs.mkdir(mode=0o700)
    os.chmod(theirs, 0o1777)
    assert paths.untrusted_folder(theirs / "kernels") == (
        f"{theirs} is owned by user {owner}, not by this one ({owner + 4242})")
    assert not (theirs / "kernels").exists()
    monkeypatch.setattr(os, "getuid", lambda: owner)
    assert paths.untrusted_folder(fallback_in_tmp / "kernels") is None


def test_nothing_is_made_inside_a_symlinked_temporary_fallback(tmp_path, monkeypatch):
    """Another user's symlink at the fallback's predictable name: refused before any folder is
    made where it points."""
    from fgcupy import paths

    monkeypatch.setattr(paths.tempfile, "gettempdir", lambda: str(tmp_path))
    victim = tmp_path / "victim"
    victim.mkdir()
    paths._temporary_root().symlink_to(victim)
    assert paths.untrusted_folder(paths._temporary_root() / "kernels").endswith("is a symlink")
    assert list(victim.iterdir()) == []
