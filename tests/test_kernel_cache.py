"""Compiled kernels on disk (fgcupy.jit.kernel_cache) and the driver loader's CPU-side behaviour."""

import logging
import os
import stat
import subprocess
import sys

import pytest

from fgcupy import paths
from fgcupy.jit import AttentionSpec, driver, kernel_cache, nvrtc
from fgcupy.jit.compile import compile_cubin

from .needs import needs_nvrtc

pytestmark = needs_nvrtc

SPEC = AttentionSpec("bfloat16", 64, 64)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache folder, under umask 022: files the tests write by hand (umask 002 makes
    them group-writable) are then what the loader trusts."""
    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(tmp_path))
    old = os.umask(0o022)
    yield tmp_path / "kernels"
    os.umask(old)


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


@pytest.mark.parametrize("damage", ["no separator", "cut short", "zeros", "not utf-8", "old format"])
def test_a_damaged_file_is_deleted_and_compiled_again(cache_dir, caplog, damage):
    compiled = compile_cubin(SPEC, "sm_80")
    kernel_cache.store(SPEC, "sm_80", compiled)
    path = kernel_cache.cache_file(SPEC, "sm_80")
    whole = path.read_bytes()
    path.write_bytes({"no separator": b"no separator here",
                      "cut short": whole[: len(whole) // 2],
                      "zeros": bytes(len(whole)),
                      "not utf-8": whole[:len(kernel_cache.MAGIC) + 32] + b"\xff\xfe\0" + compiled.cubin,
                      "old format": compiled.lowered_name.encode() + b"\0" + compiled.cubin}[damage])
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        assert kernel_cache.load(SPEC, "sm_80") is None
    assert "damaged" in caplog.text and not path.exists()


def test_another_kernels_file_under_this_ones_name_is_deleted(cache_dir, caplog):
    """An intact file copied or renamed from another spec's (a shared folder, a hand-made copy) is
    refused by the key inside it, not handed to the driver as this spec's kernel."""
    other = AttentionSpec("bfloat16", 64, 64, stages=3)
    kernel_cache.store(other, "sm_80", compile_cubin(other, "sm_80"))
    planted = kernel_cache.cache_file(SPEC, "sm_80")
    planted.write_bytes(kernel_cache.cache_file(other, "sm_80").read_bytes())
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        assert kernel_cache.load(SPEC, "sm_80") is None
    assert "another kernel's binary" in caplog.text and not planted.exists()
    assert kernel_cache.load(other, "sm_80") is not None


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o644), (0o077, 0o600)])
def test_files_are_never_writable_by_others(cache_dir, umask, mode):
    old = os.umask(umask)
    try:
        kernel_cache.store(SPEC, "sm_80", compile_cubin(SPEC, "sm_80"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(kernel_cache.cache_file(SPEC, "sm_80").stat().st_mode) == mode
    assert kernel_cache.load(SPEC, "sm_80") is not None


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="needs POSIX owners")
def test_a_file_others_may_write_or_own_is_not_run(cache_dir, caplog, monkeypatch):
    """A cubin is code the process runs: one another user could have written is compiled anew
    (and stored again, writable by its owner alone)."""
    kernel_cache.store(SPEC, "sm_80", compile_cubin(SPEC, "sm_80"))
    path = kernel_cache.cache_file(SPEC, "sm_80")
    os.chmod(path, 0o664)  # what an older version wrote under umask 002
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        assert kernel_cache.load(SPEC, "sm_80") is None
    assert "writable by other users" in caplog.text
    kernel_cache.store(SPEC, "sm_80", compile_cubin(SPEC, "sm_80"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and kernel_cache.load(SPEC, "sm_80") is not None
    owner = os.stat(path).st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 4242)  # another user: a file name of its own
    assert kernel_cache.cache_file(SPEC, "sm_80") != path and kernel_cache.load(SPEC, "sm_80") is None
    from fgcupy.paths import read_own_file

    if owner != 0:  # root's files are trusted
        with pytest.raises(PermissionError, match=f"owned by user {owner}"):
            read_own_file(path, 1 << 20)


def test_another_compiler_is_another_file(cache_dir, monkeypatch):
    first = kernel_cache.cache_file(SPEC, "sm_80")
    monkeypatch.setattr(kernel_cache, "library_identity", lambda: "libnvrtc.so.13.9:1234")
    assert kernel_cache.cache_file(SPEC, "sm_80") != first


def test_nvrtc_of_another_major_version_is_refused(monkeypatch):
    lib = nvrtc.library()
    path = next(p for p in nvrtc._wheel_paths() + [nvrtc.SYSTEM_NAME] if p == nvrtc.SYSTEM_NAME or os.path.isfile(p))
    monkeypatch.setattr(nvrtc, "_version", lambda lib: (12, 8))
    with pytest.raises(nvrtc.NvrtcError, match="NVRTC 12.8, not 13"):
        nvrtc._open(path)
    assert lib is nvrtc.library()  # the loaded one stays


def test_an_unwritable_cache_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        kernel_cache.store(SPEC, "sm_80", compile_cubin(SPEC, "sm_80"))
    assert "not writing kernels to" in caplog.text and "file is not a folder" in caplog.text


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


def test_a_cached_kernel_the_driver_refuses_is_compiled_again(fresh_runtime, monkeypatch, caplog):
    runtime = fresh_runtime
    runtime._load(SPEC, 0)  # compiled and stored
    refused = []

    class RefusesCachedOnce(_FakeFunction):
        def __init__(self, *args):
            if not refused:
                refused.append(args[0])
                raise driver.CudaDriverError("CUDA driver call cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE")
            super().__init__(*args)

    monkeypatch.setattr(runtime.driver, "Function", RefusesCachedOnce)
    compiles = []
    real = runtime.compile_cubin
    monkeypatch.setattr(runtime, "compile_cubin", lambda spec, arch: compiles.append(arch) or real(spec, arch))
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        kernel = runtime._load(SPEC, 0)
    assert refused and compiles == ["sm_80"] and isinstance(kernel.function, RefusesCachedOnce)
    assert "refused the cached" in caplog.text and kernel_cache.load(SPEC, "sm_80") is not None


def test_a_refused_cached_kernel_is_not_compiled_where_compiling_is_not_wanted(fresh_runtime, monkeypatch):
    """ready_kernel_on's load (compile_missing=False) deletes a cubin the driver refuses and returns
    None: the compile is left to a thread, not run on the caller's."""
    runtime = fresh_runtime
    runtime._load(SPEC, 0)  # compiled and stored

    def refuses(*args):
        raise driver.CudaDriverError("CUDA driver call cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE")

    monkeypatch.setattr(runtime.driver, "Function", refuses)
    monkeypatch.setattr(runtime, "compile_cubin", lambda spec, arch: pytest.fail("compiled on the caller's thread"))
    assert runtime._load(SPEC, 0, compile_missing=False) is None
    assert kernel_cache.load(SPEC, "sm_80") is None


def test_neither_nvrtc_nor_cupy_names_both(fresh_runtime, monkeypatch):
    runtime = fresh_runtime
    monkeypatch.setitem(sys.modules, "cupy", None)

    def missing():
        raise nvrtc.NvrtcUnavailable("libnvrtc (CUDA 13) not found; install nvidia-cuda-nvrtc==13.0.*")

    monkeypatch.setattr(nvrtc, "library", missing)
    with pytest.raises(nvrtc.NvrtcUnavailable, match="(?s)libnvrtc .* not found.*cupy.*not installed"):
        runtime._load_with_cupy(SPEC, 0)


EXIT_DURING_LOAD = """
import sys, threading, time, torch
from fgcupy.jit import runtime
def slow_load(spec, index, **options):
    time.sleep(1.0)
    open(sys.argv[1], "w").write("done")
    return object()
runtime._load = slow_load
runtime.load_in_background(torch.device("cuda", 0), object())
"""


def test_exit_waits_for_a_load_in_background(tmp_path):
    """A process ending while a kernel compiles waits for it (NVRTC torn down under a compile
    aborts the process)."""
    marker = tmp_path / "done"
    subprocess.run([sys.executable, "-c", EXIT_DURING_LOAD, str(marker)], check=True, timeout=60)
    assert marker.read_text() == "done"


def test_a_driver_error_about_something_else_leaves_the_cache_alone(fresh_runtime, monkeypatch):
    """Out of memory (or an earlier kernel's fault) says nothing about the file: raised as is."""
    runtime = fresh_runtime
    runtime._load(SPEC, 0)

    def out_of_memory(*args):
        raise driver.CudaDriverError("CUDA driver call cuModuleLoadData failed: CUDA_ERROR_OUT_OF_MEMORY (2)")

    monkeypatch.setattr(runtime.driver, "Function", out_of_memory)
    with pytest.raises(driver.CudaDriverError, match="OUT_OF_MEMORY"):
        runtime._load(SPEC, 0)
    assert kernel_cache.load(SPEC, "sm_80") is not None


def test_a_refused_cached_kernel_that_cannot_be_deleted_is_compiled_once(fresh_runtime, monkeypatch):
    runtime = fresh_runtime
    runtime._load(SPEC, 0)
    monkeypatch.setattr(kernel_cache, "discard", lambda spec, arch: None)  # a read-only cache
    refused = []

    class RefusesCached(_FakeFunction):
        def __init__(self, cubin, *args):
            if not refused:
                refused.append(cubin)
                raise driver.CudaDriverError("CUDA driver call cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE")
            super().__init__(cubin, *args)

    monkeypatch.setattr(runtime.driver, "Function", RefusesCached)
    compiles = []
    real = runtime.compile_cubin
    monkeypatch.setattr(runtime, "compile_cubin", lambda spec, arch: compiles.append(arch) or real(spec, arch))
    assert isinstance(runtime._load(SPEC, 0).function, RefusesCached) and compiles == ["sm_80"]


def test_cache_root_takes_absolute_folders_and_works_without_a_home(monkeypatch, tmp_path):
    from pathlib import Path

    from fgcupy import paths

    monkeypatch.delenv("FGCUPY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG rules: a relative value is ignored
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "home"))
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "fgcupy"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_root() == tmp_path / "xdg" / "fgcupy"
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    assert paths.cache_root().parent == Path(__import__("tempfile").gettempdir())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FGCUPY_CACHE_DIR", "here")
    assert paths.cache_root() == tmp_path / "here"

    def no_expansion(self):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "expanduser", no_expansion)  # a literal ~ where no home is known
    for variable in ("FGCUPY_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv("FGCUPY_CACHE_DIR", raising=False)
        monkeypatch.setenv(variable, "~/cache")
        assert paths.cache_root().parent == Path(__import__("tempfile").gettempdir())


def test_temporaries_of_killed_writers_are_swept(cache_dir):
    cache_dir.mkdir(parents=True)
    old, recent = cache_dir / ".tmp-1-dead", cache_dir / ".tmp-2-writing"
    for path in (old, recent):
        path.write_bytes(b"partial")
    os.utime(old, (1, 1))
    kernel_cache.store(SPEC, "sm_80", compile_cubin(SPEC, "sm_80"))
    assert not old.exists() and recent.exists()


def test_a_compile_error_pickles_with_its_log():
    import pickle

    from fgcupy.jit.compile import KernelCompileError

    error = pickle.loads(pickle.dumps(KernelCompileError(SPEC, "error: expected a ';'")))
    assert error.spec == SPEC and error.nvrtc_log == "error: expected a ';'" and "expected a ';'" in str(error)


def test_progress_bars_stay_quiet_without_stderr(monkeypatch):
    from fgcupy.progress import progress_bar

    monkeypatch.setattr(sys, "stderr", None)
    assert list(progress_bar(range(3))) == [0, 1, 2]


def test_a_kernel_past_the_gpus_shared_memory_is_refused_with_both_sizes(monkeypatch):
    """GPUs granting 99 KB per block (RTX 30/40/50, L40S, A10) cannot run the mma.sync default of
    head dim 256 with 128-query slices (131,328 bytes): the refusal says so, where the driver's
    named no size."""
    monkeypatch.setattr(driver, "device_attribute", lambda index, attribute: 101_376)
    spec = AttentionSpec("bfloat16", 256, 128, key_tile=32, stages=2, rows_per_warp=16)
    with pytest.raises(ValueError, match=f"needs {spec.smem_bytes:,} bytes of shared memory per block; GPU 0 grants 101,376"):
        driver.check_shared_memory(0, spec.smem_bytes, spec.name)
    driver.check_shared_memory(0, AttentionSpec("bfloat16", 256, 64, key_tile=32, stages=2, rows_per_warp=16).smem_bytes,
                               "fits")


def test_the_cupy_path_refuses_a_kernel_past_the_gpus_shared_memory_before_compiling(fresh_runtime, monkeypatch):
    """Without libnvrtc or libcuda, cupy compiles: the same refusal, naming both sizes, before it."""
    from types import SimpleNamespace

    runtime = fresh_runtime
    optin = 12345
    cuda = SimpleNamespace(runtime=SimpleNamespace(cudaDevAttrMaxSharedMemoryPerBlockOptin=optin,
                                                   deviceGetAttribute=lambda attr, index: 101_376 if attr == optin else 0),
                           Device=lambda index: pytest.fail("reached the compile"))
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(cuda=cuda))
    spec = AttentionSpec("bfloat16", 256, 128, key_tile=32, stages=2, rows_per_warp=16)
    with pytest.raises(ValueError, match=f"needs {spec.smem_bytes:,} bytes of shared memory per block; GPU 0 grants 101,376"):
        runtime._load_with_cupy(spec, 0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_device_at_the_files_path_is_not_read(cache_dir, caplog):
    """A planted FIFO would block the read forever, /dev/zero would never end."""
    path = kernel_cache.cache_file(SPEC, "sm_80")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        assert kernel_cache.load(SPEC, "sm_80") is None
    assert "cannot read the kernel cache file" in caplog.text
    os.unlink(path)
    os.symlink("/dev/zero", path)
    assert kernel_cache.load(SPEC, "sm_80") is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_inherit_a_load_in_flight():
    code = (
        "import multiprocessing as mp, threading, time\n"
        "from fgcupy.jit import driver, nvrtc, runtime\n"
        "lock = threading.Lock(); lock.acquire()  # a load in flight on a parent thread\n"
        "runtime._key_locks['k'] = lock; runtime._kernels['k'] = object()\n"
        "driver._lib_lock.acquire(); nvrtc._lib_lock.acquire()\n"
        "def child():\n"
        "    assert not runtime._key_locks and not runtime._kernels\n"
        "    with runtime._lock: pass\n"
        "    assert driver._lib_lock.acquire(timeout=5) and nvrtc._lib_lock.acquire(timeout=5)\n"
        "p = mp.get_context('fork').Process(target=child); p.start(); p.join(20)\n"
        "print(p.exitcode)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0", out.stderr


def test_a_symlinked_or_foreign_kernel_folder_is_not_written(tmp_path, monkeypatch, caplog):
    """Another user could point a cache folder they made (the temporary fallback's name is
    predictable) at this user's files: writes and sweeps there are refused."""
    elsewhere = tmp_path / "victim"
    elsewhere.mkdir()
    root = tmp_path / "cache"
    root.mkdir()
    (root / "kernels").symlink_to(elsewhere)
    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(root))
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        kernel_cache.store(SPEC, "sm_80", compile_cubin(SPEC, "sm_80"))
    assert list(elsewhere.iterdir()) == [] and "is a symlink" in caplog.text
    if hasattr(os, "getuid") and os.getuid() == 0:  # a folder of another user, without the sticky bit
        (root / "kernels").unlink()
        (root / "kernels").mkdir()
        os.chown(root / "kernels", 4321, 4321)
        assert "owned by user 4321" in paths.untrusted_folder(root / "kernels")
        os.chmod(root / "kernels", 0o1777)
        assert paths.untrusted_folder(root / "kernels") is None


def test_a_symlinked_cache_folder_gets_no_kernels_as_it_gets_no_tuned_table(tmp_path, monkeypatch, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(tmp_path / "link"))
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        kernel_cache.store(SPEC, "sm_80", compile_cubin(SPEC, "sm_80"))
    assert list(elsewhere.iterdir()) == [] and "is a symlink" in caplog.text


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="needs POSIX owners")
def test_folders_made_in_a_shared_cache_folder_are_shared(tmp_path):
    """A folder made inside one that every user may write (sticky, as /tmp) takes that mode, so
    the cache's other users can keep their own kernels there; elsewhere it keeps the umask's."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    assert paths.untrusted_folder(shared / "team" / "kernels") is None
    for made in (shared / "team", shared / "team" / "kernels"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o1777, made
    private = tmp_path / "private"
    private.mkdir(mode=0o755)
    assert paths.untrusted_folder(private / "kernels") is None
    assert not (private / "kernels").stat().st_mode & (stat.S_ISVTX | stat.S_IWOTH)


def test_the_cache_folder_is_read_once_from_its_variables(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FGCUPY_CACHE_DIR", "relative-cache")
    first = paths.cache_root()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert paths.cache_root() == first == tmp_path / "relative-cache"  # a chdir does not move it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # nor a variable it does not read
    assert paths.cache_root() == first
    monkeypatch.setenv("FGCUPY_CACHE_DIR", "~no_such_user_xyz/cache")
    with caplog.at_level(logging.WARNING, logger="fgcupy"):
        assert paths.cache_root() == paths._temporary_root()
    assert "names a home folder that does not exist" in caplog.text
    monkeypatch.delenv("FGCUPY_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "~no_such_user_xyz/c")  # ignored, as a relative one is
    assert paths.cache_root() == tmp_path / "home" / ".cache" / "fgcupy"


def test_reading_a_folder_as_a_file_leaves_no_descriptor_open(tmp_path):
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(20):
        with pytest.raises(OSError, match="not a regular file"):
            paths.read_own_file(tmp_path, 100)
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_gpus_before_ampere_cannot_run_the_kernels(monkeypatch):
    """cp.async and the bf16 tensor-core products need compute capability 8.0: a T4 or V100 would
    fail inside NVRTC, not keep the stock attention that fallback=True promises."""
    import torch

    from fgcupy.jit import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    runtime.kernels_can_run.cache_clear()
    try:
        assert runtime.kernels_can_run() is False
    finally:
        runtime.kernels_can_run.cache_clear()


@needs_nvrtc
def test_a_virtual_architecture_is_a_failed_compile_not_an_empty_kernel():
    from fgcupy.jit.compile import KernelCompileError

    with pytest.raises(KernelCompileError, match=r"for compute_80:\n(.|\n)*no binary for this architecture"):
        compile_cubin(SPEC, "compute_80")


@needs_nvrtc
def test_a_kernel_compiled_after_the_sources_changed_is_not_cached(tmp_path, monkeypatch, caplog):
    """A header edited under a running process reaches NVRTC through -I while the cache key still
    carries the old hash: a later process would load that binary for the old sources."""
    from fgcupy.jit import source

    copy = tmp_path / "cuda_src"
    copy.mkdir()
    for path in source.SOURCE_DIR.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(source, "SOURCE_DIR", copy)
    source.source_hash.cache_clear()
    source.read_source.cache_clear()
    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(tmp_path / "cache"))
    try:
        compiled = compile_cubin(SPEC, "sm_80")
        with open(copy / "common.cuh", "a") as header:
            header.write("\n// edited\n")
        with caplog.at_level(logging.WARNING, logger="fgcupy"):
            kernel_cache.store(SPEC, "sm_80", compiled)
        assert kernel_cache.load(SPEC, "sm_80") is None and "changed since this process read it" in caplog.text
    finally:
        source.source_hash.cache_clear()
        source.read_source.cache_clear()


def test_a_kernel_needing_more_shared_memory_than_the_gpu_grants_is_named_before_compiling(monkeypatch):
    from fgcupy.jit import runtime
    from fgcupy.jit.spec import Sm90WsAttentionSpec

    spec = Sm90WsAttentionSpec("bfloat16", 128)
    assert spec.smem_bytes > 101_376
    monkeypatch.setattr(driver, "available", lambda: True)
    monkeypatch.setattr(driver, "device_attribute", lambda index, attribute: 101_376)  # a 99 KB GPU
    monkeypatch.setattr(runtime, "compile_cubin", lambda *a, **kw: pytest.fail("compiled a kernel it cannot load"))
    monkeypatch.setattr(runtime.kernel_cache, "load", lambda *a: pytest.fail("read the cache for it"))
    with pytest.raises(ValueError, match=f"{spec.name} needs {spec.smem_bytes:,} bytes of shared memory per block; "
                                         "GPU 0 grants 101,376"):
        runtime._load(spec, 0)
