"""Autotuning without a GPU: candidates and fit checks, selection with a fake timer (the
never-slower-than-default rule), the cache file (round trip, second process, corrupt / foreign /
other-version files, concurrent writers), the FGCUPY_AUTOTUNE switch, and slice-size tuning
with an injected predictor, attention and timer."""

import dataclasses
import json
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from fgcupy import SliceMask, SparseAttention, autotune
from fgcupy.jit import AttentionSpec, KernelCompileError, all_attention_specs, nvrtc
from fgcupy.jit.spec import Sm90WsAttentionSpec
from fgcupy.jit.report import PtxasReport
from fgcupy.reference import reference_attention

from .needs import needs_nvrtc

REPO = Path(__file__).resolve().parent.parent
H100 = autotune.DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 65536)
ADA = autotune.DeviceInfo("NVIDIA L40S", (8, 9), 142, 101376, 65536)  # ~99 KB per block
KEY = autotune.ProblemKey.make(H100, "bfloat16", 128, 128, 32760, 32760, 0.3)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder (under umask 022: a table the test writes by hand is
    then one the loader trusts) and a clean in-process state."""
    old_umask = os.umask(0o022)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)
    autotune.TuneCache._memo.clear()
    autotune.TuneCache._warned.clear()
    autotune._session.clear()
    yield tmp_path / "cache" / autotune.CACHE_FILE
    autotune._session.clear()
    os.umask(old_umask)


def fake_report(registers=128, static_smem=0):
    def compiler(spec, arch):
        return PtxasReport(spec.name, arch, "_Zfake", registers, 0, 0, 0, static_smem, 5000, "")

    return compiler


def fake_measure(table):
    """Milliseconds by spec name; names missing from the table fail to measure."""
    seen = []

    def measure(specs):
        seen.extend(specs)
        return {s: autotune.Measurement(table.get(s.name), 1.0 if s.name in table else None,
                                        "" if s.name in table else "boom") for s in specs}

    measure.seen = seen
    return measure


def fake_result(key=KEY, winner=None, ms=1.0):
    winner = winner or AttentionSpec(key.dtype, key.head_dim, key.slice_m, 32, 3)
    default = autotune.heuristic_spec(key.dtype, key.head_dim, key.slice_m, key.arch)
    cands = [autotune.Candidate(s, 100, s.smem_bytes, 0, m, 1.0, "ok") for s, m in ((default, 2 * ms), (winner, ms))]
    return autotune.TuneResult(key, default, winner, True, cands, 0.5)


# ---- keys and buckets ------------------------------------------------------------------------
def test_buckets_and_key_id():
    assert autotune.length_bucket(32_760) == 32_768
    assert autotune.length_bucket(17_550) == 16_384
    assert autotune.length_bucket(75_600) == 65_536
    assert autotune.length_bucket(10) == 128
    assert autotune.density_bucket(0.3) == 0.3
    assert autotune.density_bucket(0.27) == 0.3
    assert autotune.density_bucket(0.9) == 1.0
    assert autotune.density_bucket(1e-5) == 0.01
    assert KEY.id == "NVIDIA H100 80GB HBM3|sm_90|bfloat16|d128|m128|q32768|kv32768|p0.3"
    other = autotune.ProblemKey.make(ADA, "bfloat16", 128, 128, 32760, 32760, 0.3)
    assert other.id != KEY.id and other.arch == "sm_89"


def test_density_estimate_reads_shapes_only():
    full = SliceMask.full(1, 2, 300, 200, 64)
    assert autotune.mask_density_estimate(full) == 1.0
    topk = torch.stack([torch.randperm(200)[:50] for _ in range(2 * 5)]).reshape(1, 2, 5, 50)
    assert autotune.mask_density_estimate(SliceMask.from_topk(topk, 64, 300, 200)) == pytest.approx(0.25)


# ---- candidates and fit ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype, head_dim, slice_m", [("bfloat16", 128, 128), ("float16", 64, 64), ("bfloat16", 64, 128)])
def test_candidates_are_the_shipped_specs_of_the_key(dtype, head_dim, slice_m):
    cands = autotune.candidate_specs(dtype, head_dim, slice_m)
    shipped = [s for s in all_attention_specs() if (s.dtype, s.head_dim, s.slice_m) == (dtype, head_dim, slice_m)]
    assert set(cands) == set(shipped) | {autotune.heuristic_spec(dtype, head_dim, slice_m)}
    assert len(set(cands)) == len(cands)
    assert len({s.key_tile for s in cands}) >= 2 and len({s.stages for s in cands}) == 2
    assert autotune.heuristic_spec(dtype, head_dim, slice_m) in cands


def test_hopper_candidates_add_both_wgmma_kernels_and_default_to_one():
    from fgcupy.jit import Sm90AttentionSpec, Sm90WsAttentionSpec, all_sm90_specs, all_sm90_ws_specs

    hopper = (Sm90AttentionSpec, Sm90WsAttentionSpec)
    cands = autotune.candidate_specs("bfloat16", 128, 128, "sm_90")
    for shipped in (all_sm90_specs(), all_sm90_ws_specs()):
        wgmma = [s for s in shipped if (s.dtype, s.head_dim, s.slice_m) == ("bfloat16", 128, 128)]
        assert wgmma and set(wgmma) <= set(cands)
    default = autotune.heuristic_spec("bfloat16", 128, 128, "sm_90")
    assert isinstance(default, Sm90WsAttentionSpec) and default in cands
    assert isinstance(autotune.heuristic_spec("bfloat16", 64, 128, "sm_90"), hopper)
    assert not any(isinstance(s, hopper) for s in autotune.candidate_specs("bfloat16", 128, 128, "sm_80"))


def test_fit_skips_what_does_not_compile_or_fit():
    big = AttentionSpec("bfloat16", 128, 128, 128, 2)  # ~161 KB of shared memory
    small = AttentionSpec("bfloat16", 128, 128, 32, 2)
    assert autotune.check_fit(big, H100, fake_report()).reason is None
    assert "smem" in autotune.check_fit(big, ADA, fake_report()).reason
    assert autotune.check_fit(small, ADA, fake_report()).reason is None
    # static shared memory counts on top of the dynamic part
    assert "smem" in autotune.check_fit(small, ADA, fake_report(static_smem=40_000)).reason
    # 200 registers x 256 threads > a 32 K register file per block (e.g. a Jetson-class part)
    small_regs = autotune.DeviceInfo("small", (8, 7), 16, 166912, 32768)
    assert "regs" in autotune.check_fit(small, small_regs, fake_report(registers=200)).reason
    assert autotune.check_fit(small, small_regs, fake_report(registers=128)).reason is None

    def broken(spec, arch):
        raise KernelCompileError(spec, "sparse_attn.cu(12): error: expected a ';'")

    fit = autotune.check_fit(small, H100, broken)
    assert fit.reason.startswith("compile failed") and "expected a ';'" in fit.reason

    def unreadable(spec, arch):
        raise ValueError("cannot find 'Used (\\d+) registers'")

    assert autotune.check_fit(small, H100, unreadable).reason.startswith("no ptxas report")


def test_fit_without_libnvrtc_judges_shared_memory_from_the_spec():
    def missing(spec, arch):
        raise nvrtc.NvrtcUnavailable("libnvrtc (CUDA 13) not found")

    big = AttentionSpec("bfloat16", 128, 128, 128, 2)
    assert autotune.check_fit(big, H100, missing).reason is None
    assert "smem" in autotune.check_fit(big, ADA, missing).reason
    assert autotune.check_fit(big, H100, missing).registers is None


@needs_nvrtc
def test_fit_uses_the_real_ptxas_report_for_the_device_arch():
    default = autotune.heuristic_spec("bfloat16", 128, 128)  # the mma.sync kernel: any arch
    fit = autotune.check_fit(default, H100)
    assert fit.reason is None and 0 < fit.registers <= 255 and fit.spill_bytes == 0
    seen = []

    def spy(spec, arch):
        seen.append(arch)
        return autotune._cached_compile_report(spec, arch)

    autotune.check_fit(default, ADA, spy)
    assert seen == ["sm_89"]


def test_tune_skips_unfit_candidates_before_measuring():
    info = ADA
    cands = autotune.candidate_specs("bfloat16", 128, 128, info.arch)
    # every candidate "measures" fast, the too-large ones fastest: they must never be timed
    table = {s.name: (0.5 if s.smem_bytes > info.smem_per_block_optin else 5.0) for s in cands}
    measure = fake_measure(table)
    result = autotune.tune(autotune.ProblemKey.make(info, "bfloat16", 128, 128, 4096, 4096, 1.0), info, measure,
                           compiler=fake_report())
    assert all(s.smem_bytes <= info.smem_per_block_optin for s in measure.seen)
    assert result.winner.smem_bytes <= info.smem_per_block_optin
    skipped = [c for c in result.candidates if c.status.startswith("skipped")]
    assert skipped and all(c.ms is None for c in skipped)
    assert "skipped: smem" in result.table()


# ---- selection -------------------------------------------------------------------------------
DEFAULT = autotune.heuristic_spec("bfloat16", 128, 128, KEY.arch)
OTHER = AttentionSpec("bfloat16", 128, 128, 32, 3)
THIRD = AttentionSpec("bfloat16", 128, 128, 128, 2)


@pytest.mark.parametrize(
    "timings, expected",
    [
        ({DEFAULT: 10.0, OTHER: 9.8, THIRD: 12.0}, DEFAULT),  # 2 % faster: noise, keep the default
        ({DEFAULT: 10.0, OTHER: 9.71, THIRD: 12.0}, DEFAULT),  # just inside the 3 % margin
        ({DEFAULT: 10.0, OTHER: 9.5, THIRD: 9.0}, THIRD),  # clear win: the fastest
        ({DEFAULT: 10.0, OTHER: 11.0}, DEFAULT),
        ({DEFAULT: None, OTHER: 11.0, THIRD: 12.0}, OTHER),  # default could not run: fastest
        ({DEFAULT: float("nan"), OTHER: 11.0}, OTHER),
        ({DEFAULT: None, OTHER: None}, None),
    ],
)
def test_select_never_slower_than_default_beyond_noise(timings, expected):
    assert autotune.select_winner(timings, DEFAULT) == expected


def test_tune_with_fake_timer_picks_the_clear_winner_and_keeps_default_otherwise():
    cands = autotune.candidate_specs("bfloat16", 128, 128, KEY.arch)
    base = {s.name: 10.0 + i for i, s in enumerate(cands)}
    base[DEFAULT.name] = 10.0
    fast = dict(base, **{OTHER.name: 8.0})
    result = autotune.tune(KEY, H100, fake_measure(fast), compiler=fake_report())
    assert result.measured and result.winner == OTHER
    assert result.speedup == pytest.approx(10.0 / 8.0)
    noise = dict(base, **{OTHER.name: 9.9})
    assert autotune.tune(KEY, H100, fake_measure(noise), compiler=fake_report()).winner == DEFAULT


def test_tune_with_nothing_measurable_keeps_the_default_and_stores_nothing(isolated_cache):
    result = autotune.tune(KEY, H100, fake_measure({}), compiler=fake_report())
    assert not result.measured and result.winner == DEFAULT
    assert all(c.status.startswith("failed") for c in result.candidates)
    assert autotune.TuneCache().store([result])
    assert not isolated_cache.exists()


def test_progress_lines_while_tuning():
    lines = []
    autotune.tune(KEY, H100, fake_measure({DEFAULT.name: 1.0}), compiler=fake_report(), progress=lines.append)
    assert lines[0].startswith(KEY.id) and "checking" in lines[0]
    assert any("timing" in line for line in lines) and "winner" in lines[-1]


# ---- cache file ------------------------------------------------------------------------------
def test_cache_location_env(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "x"))
    assert autotune.cache_path() == tmp_path / "x" / "autotune.json"
    monkeypatch.delenv(autotune.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "fgcupy" / "autotune.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_path() == tmp_path / "home" / ".cache" / "fgcupy" / "autotune.json"


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="needs POSIX owners")
def test_a_cache_folder_of_another_user_holds_a_table_per_user(monkeypatch, tmp_path):
    """Another user's table (private to them) is neither read nor replaced: each user of a
    shared cache folder keeps its own file."""
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    assert autotune.cache_path() == tmp_path / "autotune.json"
    other = os.stat(tmp_path).st_uid + 4242
    monkeypatch.setattr(os, "getuid", lambda: other)
    assert autotune.cache_path() == tmp_path / f"autotune-u{other}.json"


def test_round_trip_and_header(isolated_cache):
    result = fake_result()
    assert autotune.TuneCache().store([result], H100)
    data = json.loads(isolated_cache.read_text())
    header = data["header"]
    assert header["library"] == "fgcupy" and header["format"] == autotune.FORMAT
    assert header["version"] == autotune.library_stamp()["version"]
    assert header["kernel_hash"] == autotune.library_stamp()["kernel_hash"]
    assert header["gpus"]["NVIDIA H100 80GB HBM3|sm_90"]["sm_count"] == 132
    entry = data["entries"][KEY.id]
    assert entry["spec_name"] == OTHER.name and entry["default_ms"] == 2.0 and entry["winner_ms"] == 1.0
    assert [c["spec"] for c in entry["candidates"]] == [DEFAULT.name, OTHER.name]
    autotune.TuneCache._memo.clear()
    assert autotune.TuneCache().lookup(KEY) == OTHER
    assert autotune.TuneCache().lookup(autotune.ProblemKey.make(ADA, "bfloat16", 128, 128, 32760, 32760, 0.3)) is None
    assert not list(isolated_cache.parent.glob(".autotune-*.tmp")), "temporary file left behind"


def test_a_second_process_reuses_the_file(isolated_cache):
    from fgcupy.jit.source import source_hash

    source_hash.cache_clear()  # stamp the file with the kernel sources the child will hash
    autotune.TuneCache().store([fake_result()], H100)
    code = (
        "from fgcupy import autotune\n"
        "key = autotune.ProblemKey.make(autotune.DeviceInfo('NVIDIA H100 80GB HBM3', (9, 0), 132, 232448, 65536),"
        " 'bfloat16', 128, 128, 32760, 32760, 0.3)\n"
        "calls = []\n"
        "spec = autotune.choose_spec(key, None, lambda k: calls.append(k))\n"
        "print(spec.name, len(calls))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), FGCUPY_AUTOTUNE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [OTHER.name, "0"]  # found, and no tune ran


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{\"header\": {\"library\": \"fgcupy\", \"form", "corrupt"),
        (b"\x00\xff garbage", "corrupt"),
        (b"[1, 2, 3]", "not an fgcupy autotune file"),
        (json.dumps({"header": {"library": "someone-else", "format": 1}, "entries": {}}).encode(), "not an fgcupy"),
    ],
)
def test_corrupt_or_foreign_file_warns_then_a_fresh_tune_replaces_it(isolated_cache, content, message):
    isolated_cache.parent.mkdir(parents=True)
    isolated_cache.write_bytes(content)
    with pytest.warns(autotune.AutotuneCacheWarning, match=message):
        assert autotune.TuneCache().lookup(KEY) is None
    with pytest.warns(autotune.AutotuneCacheWarning):
        assert autotune.TuneCache().store([fake_result()], H100)
    autotune.TuneCache._memo.clear()
    assert autotune.TuneCache().lookup(KEY) == OTHER


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and POSIX owners")
@pytest.mark.parametrize("plant", ["fifo", "endless", "writable by others"])
def test_a_file_that_is_no_table_of_ours_is_neither_read_nor_wiped(isolated_cache, plant):
    """A FIFO blocked planning, /dev/zero ran out of memory; a table others may write could steer
    the kernel choice. Each is a warning; tuned results stay in the process until it is gone."""
    isolated_cache.parent.mkdir(parents=True)
    if plant == "fifo":
        os.mkfifo(isolated_cache)
    elif plant == "endless":
        os.symlink("/dev/zero", isolated_cache)
    else:
        assert autotune.TuneCache().store([fake_result()], H100)
        os.chmod(isolated_cache, 0o666)
        autotune.TuneCache._memo.clear()
    with pytest.warns(autotune.AutotuneCacheWarning, match="cannot read"):
        assert autotune.TuneCache().lookup(KEY) is None
    with pytest.warns(autotune.AutotuneCacheWarning, match="it is left as it is"):
        assert not autotune.TuneCache().store([fake_result()], H100)  # nothing of it is wiped
    assert os.path.lexists(isolated_cache)
    os.remove(isolated_cache)  # what the warning says to do
    assert autotune.TuneCache().store([fake_result()], H100)
    autotune.TuneCache._memo.clear()
    assert autotune.TuneCache().lookup(KEY) == OTHER


def test_a_newer_fgcupys_file_is_read_as_empty_and_never_overwritten(isolated_cache):
    isolated_cache.parent.mkdir(parents=True)
    content = json.dumps({"header": {"library": "fgcupy", "format": 99}, "entries": {"x": {}}}).encode()
    isolated_cache.write_bytes(content)
    with pytest.warns(autotune.AutotuneCacheWarning, match="newer fgcupy"):
        assert autotune.TuneCache().lookup(KEY) is None
    with pytest.warns(autotune.AutotuneCacheWarning, match="newer fgcupy"):
        assert not autotune.TuneCache().store([fake_result()], H100)
    assert isolated_cache.read_bytes() == content


@pytest.mark.parametrize("field", ["version", "kernel_hash", "candidates_hash", "nvrtc"])
def test_other_version_or_kernels_is_stale(isolated_cache, monkeypatch, field):
    current = autotune.library_stamp()
    monkeypatch.setattr(autotune.store, "library_stamp", lambda: dict(current, **{field: "0.0.0-old"}))
    autotune.TuneCache().store([fake_result()], H100)
    monkeypatch.setattr(autotune.store, "library_stamp", lambda: current)
    autotune.TuneCache._memo.clear()
    with pytest.warns(autotune.AutotuneCacheWarning, match="0.0.0-old"):
        assert autotune.TuneCache().lookup(KEY) is None
    # a fresh tune for this version is stored beside the other version's table, never mixed with it
    other_key = autotune.ProblemKey.make(H100, "bfloat16", 128, 64, 32760, 32760, 1.0)
    autotune.TuneCache().store([fake_result(other_key, AttentionSpec("bfloat16", 128, 64, 32, 2))], H100)
    data = json.loads(isolated_cache.read_text())
    assert list(data["entries"]) == [other_key.id] and data["header"][field] == current[field]
    (old_table,) = data["other_versions"].values()
    assert list(old_table["entries"]) == [KEY.id] and old_table["header"][field] == "0.0.0-old"
    # ... and the older version still finds its own results after the newer one wrote
    monkeypatch.setattr(autotune.store, "library_stamp", lambda: dict(current, **{field: "0.0.0-old"}))
    autotune.TuneCache._memo.clear()
    assert autotune.TuneCache().lookup(KEY) == OTHER


def test_unusable_entry_is_ignored_with_a_warning(isolated_cache):
    autotune.TuneCache().store([fake_result()], H100)
    data = json.loads(isolated_cache.read_text())
    data["entries"][KEY.id]["spec"]["key_tile"] = 48
    isolated_cache.write_text(json.dumps(data))
    with pytest.warns(autotune.AutotuneCacheWarning, match="unusable entry"):
        assert autotune.TuneCache().lookup(KEY) is None


@pytest.mark.parametrize("entry, message", [
    ([1, 2], "an entry must be an object"),
    ({"spec": "x"}, "an entry must be an object with a spec object"),
    ({"spec": {"dtype": "bfloat16", "head_dim": 128, "slice_m": 128, "key_tile": 32.0, "stages": 3,
               "rows_per_warp": 32}}, "spec fields must be ints or strings"),
    ({"spec": {"dtype": "bfloat16", "head_dim": 128, "slice_m": 128, "key_tile": True}}, "ints or strings"),
    ({"kernel": "Evil", "spec": {}}, "unusable entry"),
])
def test_foreign_entries_never_reach_plan(isolated_cache, entry, message):
    autotune.TuneCache().store([fake_result()], H100)
    data = json.loads(isolated_cache.read_text())
    data["entries"][KEY.id] = entry
    isolated_cache.write_text(json.dumps(data))
    autotune.TuneCache._memo.clear()
    with pytest.warns(autotune.AutotuneCacheWarning, match=message):
        assert autotune.TuneCache().lookup(KEY) is None


def test_a_stored_kernel_the_gpu_cannot_run_is_ignored(isolated_cache):
    """A Hopper kernel under an Ampere key (a hand-edited or foreign file) is not a candidate there."""
    a100 = autotune.DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912, 65536)
    key = autotune.ProblemKey.make(a100, "bfloat16", 128, 128, 32760, 32760, 0.3)
    autotune.TuneCache().store([fake_result(key)], a100)
    data = json.loads(isolated_cache.read_text())
    hopper = Sm90WsAttentionSpec("bfloat16", 128, 128, 128, 2, 1)
    data["entries"][key.id].update(kernel="Sm90WsAttentionSpec", spec=dataclasses.asdict(hopper), spec_name=hopper.name)
    isolated_cache.write_text(json.dumps(data))
    autotune.TuneCache._memo.clear()
    with pytest.warns(autotune.AutotuneCacheWarning, match="not a kernel for sm_80"):
        assert autotune.TuneCache().lookup(key) is None


def test_deeply_nested_file_is_corrupt_not_a_crash(isolated_cache):
    isolated_cache.parent.mkdir(parents=True)
    isolated_cache.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.warns(autotune.AutotuneCacheWarning, match="corrupt"):
        assert autotune.TuneCache().lookup(KEY) is None


def test_spec_fields_are_strictly_typed():
    with pytest.raises(ValueError, match="key_tile must be one of"):
        AttentionSpec("bfloat16", 128, 128, 32.0, 3)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        AttentionSpec("bfloat16", True, 128)


def test_lock_is_private_never_follows_a_symlink_and_is_waited_on_briefly(isolated_cache, monkeypatch):
    import fcntl
    import os
    import stat

    isolated_cache.parent.mkdir(parents=True)
    lock = isolated_cache.with_name(isolated_cache.name + ".lock")
    assert autotune.TuneCache().store([fake_result()], H100)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    # another process holds the lock: the writer gives up after the timeout, with a warning
    monkeypatch.setattr(autotune.store, "LOCK_TIMEOUT_S", 0.2)
    holder = os.open(lock, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.warns(autotune.AutotuneCacheWarning, match="stayed locked"):
            assert autotune.TuneCache().store([fake_result()], H100) is False
    finally:
        os.close(holder)
    # a symlink planted where the lock goes is not followed
    target = isolated_cache.parent / "victim"
    target.write_text("keep me")
    lock.unlink()
    lock.symlink_to(target)
    with pytest.warns(autotune.AutotuneCacheWarning, match="cannot write"):
        assert autotune.TuneCache().store([fake_result()], H100) is False
    assert target.read_text() == "keep me"


def test_temporaries_of_killed_writers_are_swept(isolated_cache):
    import os

    isolated_cache.parent.mkdir(parents=True)
    old, recent = isolated_cache.parent / ".autotune-dead.tmp", isolated_cache.parent / ".autotune-writing.tmp"
    for path in (old, recent):
        path.write_text("{")
    os.utime(old, (1, 1))
    assert autotune.TuneCache().store([fake_result()], H100)
    assert not old.exists() and recent.exists()


def test_unwritable_folder_warns_and_keeps_going(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(autotune.CACHE_ENV, str(blocker / "cache"))
    with pytest.warns(autotune.AutotuneCacheWarning, match="not writing .* Not a directory"):
        assert autotune.TuneCache().store([fake_result()], H100) is False
    assert autotune.TuneCache().lookup(KEY) is None


def _writer(path, worker, count):
    """One process storing ``count`` distinct keys one at a time (read-merge-write each)."""
    cache = autotune.TuneCache(path)
    for i in range(count):
        key = autotune.ProblemKey(f"GPU {worker}", "sm_90", "bfloat16", 128, 128, 1024 * (i + 1), 1024, 0.3)
        cache.store([fake_result(key)], None)


def test_concurrent_writers_lose_nothing(isolated_cache):
    workers, count = 6, 8
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(isolated_cache), w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = json.loads(isolated_cache.read_text())["entries"]
    assert len(entries) == workers * count
    assert {e["key"]["gpu"] for e in entries.values()} == {f"GPU {w}" for w in range(workers)}


# ---- the switch and the plan-time choice -----------------------------------------------------
def test_default_mode_uses_cache_or_heuristic_and_never_tunes(isolated_cache):
    calls = []
    assert autotune.choose_spec(KEY, DEFAULT, calls.append) == DEFAULT
    autotune._session.clear()
    autotune.TuneCache().store([fake_result()], H100)
    assert autotune.choose_spec(KEY, DEFAULT, calls.append) == OTHER
    assert calls == []


def test_autotune_on_tunes_once_and_stores(isolated_cache, monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    calls = []

    def tune_fn(key):
        calls.append(key)
        return fake_result(key)

    assert autotune.choose_spec(KEY, DEFAULT, tune_fn, gpu=H100) == OTHER
    assert autotune.choose_spec(KEY, DEFAULT, tune_fn, gpu=H100) == OTHER
    assert len(calls) == 1
    autotune._session.clear()  # as a new process would: the file answers
    assert autotune.choose_spec(KEY, DEFAULT, tune_fn, gpu=H100) == OTHER
    assert len(calls) == 1
    assert KEY.id in json.loads(isolated_cache.read_text())["entries"]


def test_a_tune_put_off_is_not_remembered(isolated_cache, monkeypatch):
    """A plan during CUDA graph capture does not tune (tune_fn returns None): the default then,
    a tune at the next plan outside capture."""
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    calls = []

    def tune_fn(key):
        calls.append(key)
        return None if len(calls) == 1 else fake_result(key)

    assert autotune.choose_spec(KEY, DEFAULT, tune_fn, gpu=H100) == DEFAULT
    assert autotune.choose_spec(KEY, DEFAULT, tune_fn, gpu=H100) == OTHER
    assert autotune.choose_spec(KEY, DEFAULT, tune_fn, gpu=H100) == OTHER
    assert len(calls) == 2


def test_a_tune_holds_its_own_key_alone(isolated_cache, monkeypatch):
    """While one thread tunes a key for minutes, another plans a different key at once."""
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    started, release = threading.Event(), threading.Event()

    def slow_tune(key):
        started.set()
        release.wait(30)
        return fake_result(key)

    tuning = threading.Thread(target=autotune.choose_spec, args=(KEY, DEFAULT, slow_tune), kwargs={"gpu": H100})
    tuning.start()
    try:
        assert started.wait(30)
        other = autotune.ProblemKey.make(H100, "bfloat16", 128, 64, 32760, 32760, 0.3)
        monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
        done = []
        planner = threading.Thread(target=lambda: done.append(autotune.choose_spec(other, DEFAULT, slow_tune)))
        planner.start()
        planner.join(5)
        assert done == [DEFAULT], "planning another key waited for the tune"
    finally:
        release.set()
        tuning.join(30)
    assert autotune.choose_spec(KEY, DEFAULT, slow_tune) == OTHER


def test_tunes_on_one_gpu_model_take_turns(isolated_cache, monkeypatch):
    """Two keys tuned from two threads: their timings never overlap (each would time the other)."""
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    running, peak, lock = [0], [0], threading.Lock()

    def tune(key):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return fake_result(key)

    keys = [KEY, autotune.ProblemKey.make(H100, "bfloat16", 128, 64, 32760, 32760, 0.3)]
    threads = [threading.Thread(target=autotune.choose_spec, args=(key, DEFAULT, tune), kwargs={"gpu": H100})
               for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert peak[0] == 1


def test_failed_tune_warns_and_falls_back(monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")

    def tune_fn(key):
        raise RuntimeError("out of memory")

    with pytest.warns(autotune.AutotuneCacheWarning, match="out of memory"):
        assert autotune.choose_spec(KEY, DEFAULT, tune_fn) == DEFAULT


@pytest.mark.parametrize("value, expected", [("1", True), ("on", True), ("0", False), ("", False), ("no", False)])
def test_switch_values(monkeypatch, value, expected):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, value)
    assert autotune.autotune_enabled() is expected


def test_bad_switch_value_warns(monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "sometimes")
    with pytest.warns(autotune.AutotuneCacheWarning, match="sometimes"):
        assert autotune.autotune_enabled() is False


def test_plan_without_tile_arguments_takes_the_heuristic_on_cpu():
    """On CPU (the reference runs) the autotune hook gives the heuristic spec and loads nothing."""
    mask = SliceMask.full(1, 2, 100, 80, 64)
    assert autotune.planned_spec(mask, 64, "float16") == autotune.heuristic_spec("float16", 64, 64)
    attn = SparseAttention().plan(mask, head_dim=64, dtype=torch.float16)
    assert attn.spec == autotune.heuristic_spec("float16", 64, 64)


def test_plan_consults_the_tuner_only_without_tile_arguments(monkeypatch):
    """The hook in SparseAttention.plan: no tile arguments -> planned_spec; any tile argument or
    an explicit spec -> untouched."""
    calls = []

    def spy(mask, head_dim, dtype):
        calls.append((head_dim, dtype))
        return autotune.heuristic_spec(dtype, head_dim, mask.slice_m)

    monkeypatch.setattr(autotune, "planned_spec", spy)
    mask = SliceMask.full(1, 2, 100, 80, 64)
    explicit = AttentionSpec("float16", 64, 64, 32, 3)
    for kwargs in ({}, {"key_tile": 32}, {"stages": 3}, {"rows_per_warp": 16}, {"spec": explicit}):
        SparseAttention().plan(mask, head_dim=64, dtype=torch.float16, **kwargs)
    assert calls == [(64, "float16")]


def test_command_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert autotune.main(["--preset", "cogvideox5b"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--density", "0"], ["--density", "1.5"], ["--reps", "0"]])
def test_command_refuses_settings_it_cannot_tune(argv, capsys):
    with pytest.raises(SystemExit):
        autotune.main(argv)
    assert "must be" in capsys.readouterr().err


def test_command_shows_a_hand_edited_entry_without_crashing(isolated_cache, monkeypatch, capsys):
    """A stored entry with only its spec (no name, no candidate table) is shown as cached."""
    from fgcupy.autotune import cli

    key = autotune.ProblemKey.make(H100, "bfloat16", 64, 64, 17550, 17550, 1.0)
    autotune.TuneCache().store([fake_result(key)], H100)
    data = json.loads(isolated_cache.read_text())
    data["entries"][key.id] = {"spec": data["entries"][key.id]["spec"], "candidates": [{"spec": 1}],
                               "default_ms": "2.0 ms", "winner_ms": math.nan}
    isolated_cache.write_text(json.dumps(data))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cli.DeviceInfo, "of", staticmethod(lambda device: H100))
    assert autotune.main(["--preset", "cogvideox5b", "--density", "1.0", "--slice-m", "64", "--no-store"]) == 0
    out = capsys.readouterr().out
    assert "cached" in out and "unreadable" in out and AttentionSpec("bfloat16", 64, 64, 32, 3).name in out


# ---- slice-size tuning -----------------------------------------------------------------------
def local_qkv(seq=256, heads=2, d=32, seed=0):
    """Each query attends almost only to its own key: a block of M queries needs its M keys,
    so M=64 meets a tight target at a quarter of the keys and M=128 only at half."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, seq, d, generator=gen)
    q = 8 * k + 0.5 * torch.randn(1, heads, seq, d, generator=gen)
    v = torch.randn(1, heads, seq, d, generator=gen)
    return q, k, v


def exact_predictor(calls):
    """Top-k keys by the block's maximum softmax probability (an oracle for the real predictor)."""

    def predict(q, k, *, slice_m, method, density):
        calls.append((slice_m, method, density))
        assert method == "topk"
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        b, h, s, kv = probs.shape
        block_max = probs.reshape(b, h, s // slice_m, slice_m, kv).amax(dim=3)
        keep = max(1, round(density * kv))
        return SliceMask.from_topk(torch.topk(block_max, keep, dim=-1).indices, slice_m, s, kv)

    return predict


def reference_attend(q, k, v, mask):
    return reference_attention(q, k, v, mask)[0]


def fake_slice_timer(attention_cost):
    """Scoring costs 1 ms; attention costs density x attention_cost[M] ms."""
    labels = []

    def timer(fn, label):
        fn()
        labels.append(label)
        if label["stage"] == "scoring":
            return 1.0
        return label["density"] * attention_cost[label["slice_m"]]

    timer.labels = labels
    return timer


@pytest.mark.parametrize("cost, expected_m", [({64: 10.0, 128: 10.0}, 64), ({64: 30.0, 128: 10.0}, 128)])
def test_tune_slice_meets_target_at_least_time(cost, expected_m):
    q, k, v = local_qkv()
    calls = []
    timer = fake_slice_timer(cost)
    choice = autotune.tune_slice(q, k, v, 2e-2, predictor=exact_predictor(calls), attend=reference_attend,
                                 timer=timer, heads=2)
    assert choice.met_target and choice.rel_l2 <= 2e-2
    assert choice.slice_m == expected_m
    # grid then bisection land on the smallest passing density: exactly the block's own keys
    assert choice.density == pytest.approx({64: 0.25, 128: 0.5}[expected_m])
    assert choice.total_ms == pytest.approx(1.0 + choice.density * cost[expected_m])
    # every timed configuration met the target; the choice is the cheapest of them
    timed = {(lbl["slice_m"], lbl["density"]) for lbl in timer.labels}
    assert len(timed) == 2
    assert {m for m, _, _ in calls} == {64, 128}
    assert all(t.rel_l2 > 2e-2 for t in choice.trials if t.slice_m == 64 and t.density < 0.24)
    assert any(t.density < 0.25 for t in choice.trials if t.slice_m == 64)


def test_tune_slice_samples_heads():
    q, k, v = local_qkv(heads=4)
    seen = []

    def attend(q_, k_, v_, mask):
        seen.append(q_.shape[1])
        return reference_attend(q_, k_, v_, mask)

    choice = autotune.tune_slice(q, k, v, 2e-2, predictor=exact_predictor([]), attend=attend,
                                 timer=fake_slice_timer({64: 10.0, 128: 10.0}), heads=2)
    assert set(seen) == {2}
    assert (choice.heads_sampled, choice.heads_total) == (2, 4)
    assert choice.estimated_full_ms == pytest.approx(2 * choice.total_ms)


def test_tune_slice_unreachable_target_warns_and_returns_most_accurate():
    q, k, v = local_qkv()
    with pytest.warns(RuntimeWarning, match="no slice size meets"):
        choice = autotune.tune_slice(q, k, v, 1e-12, predictor=exact_predictor([]), attend=reference_attend,
                                     timer=fake_slice_timer({64: 10.0, 128: 10.0}), densities=(0.1, 0.5, 1.0))
    assert not choice.met_target
    assert choice.rel_l2 == min(t.rel_l2 for t in choice.trials)


def test_tune_slice_rejects_bad_arguments():
    q, k, v = local_qkv()
    with pytest.raises(ValueError, match="target"):
        autotune.tune_slice(q, k, v, 0.0, predictor=exact_predictor([]))
    with pytest.raises(ValueError, match="densities"):
        autotune.tune_slice(q, k, v, 0.1, predictor=exact_predictor([]), densities=(0.0, 0.5))


def test_looking_a_choice_up_loads_no_tuning_module():
    """A process's first attention call only looks the tuned kernel up: importing fgcupy and
    reaching planned_spec must not load the measuring, slice-tuning or command-line modules (nor
    the workloads), which cost the first call about 10 ms; their names still resolve on use."""
    code = ("import sys, fgcupy, fgcupy.autotune as a; a.planned_spec; "
            "heavy = ('fgcupy.autotune.measure', 'fgcupy.autotune.slices', 'fgcupy.autotune.cli', 'fgcupy.workloads'); "
            "print(sorted(m for m in heavy if m in sys.modules)); a.tune_slice, a.main, a.EventMeasure; "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.strip().splitlines()
    assert before == "[]"
    assert after == str(["fgcupy.autotune.cli", "fgcupy.autotune.measure", "fgcupy.autotune.slices", "fgcupy.workloads"])


def test_a_stored_kernel_past_the_gpus_shared_memory_is_not_used():
    """A winner stored under a 99 KB GPU's key that needs more (a hand-edited or foreign file) is
    passed over for the default, with a warning, rather than failing at its load."""
    key = autotune.ProblemKey.make(ADA, "bfloat16", 128, 128, 32760, 32760, 0.3)
    big = AttentionSpec("bfloat16", 128, 128, 64, 3)
    assert big.smem_bytes > ADA.smem_per_block_optin
    autotune.TuneCache().store([fake_result(key, winner=big)], ADA)
    default = autotune.heuristic_spec("bfloat16", 128, 128, ADA.arch)
    with pytest.warns(autotune.AutotuneCacheWarning, match="grants 101,376; not using it"):
        assert autotune.choose_spec(key, default, lambda k: None, gpu=ADA) == default


def test_an_entry_whose_spec_lacks_a_field_is_ignored(isolated_cache):
    """A missing field would take its default: a kernel that was never tuned."""
    autotune.TuneCache().store([fake_result(KEY)], H100)
    data = json.loads(isolated_cache.read_text())
    data["entries"][KEY.id]["spec"] = {"dtype": "bfloat16", "head_dim": 128, "slice_m": 128}
    isolated_cache.write_text(json.dumps(data))
    autotune.TuneCache._memo.clear()
    with pytest.warns(autotune.AutotuneCacheWarning, match=r"its spec lacks \['key_tile', 'stages', 'rows_per_warp'\]"):
        assert autotune.TuneCache().lookup(KEY) is None
    data["entries"][KEY.id]["spec"] = dataclasses.asdict(AttentionSpec("bfloat16", 128, 128, 64, 2))
    isolated_cache.write_text(json.dumps(data))
    autotune.TuneCache._memo.clear()
    with pytest.warns(autotune.AutotuneCacheWarning, match=r"its spec_name says"):
        assert autotune.TuneCache().lookup(KEY) is None


def test_older_versions_give_way_so_the_file_stays_readable(isolated_cache, monkeypatch):
    """Each version's table is kept beside the others only while the file stays within what
    its reader takes; this version's results are always stored and read back."""
    from fgcupy.autotune import store

    monkeypatch.setattr(store, "MAX_FILE_BYTES", 20_000)
    seconds = iter(range(60))
    monkeypatch.setattr(store.time, "strftime", lambda fmt, *args: f"2026-12-06T00:00:{next(seconds):02d}")
    keys = [autotune.ProblemKey.make(H100, "bfloat16", 128, 128, 1024 * (i + 1), 1024 * (i + 1), 0.3) for i in range(6)]
    for version in range(6):
        monkeypatch.setattr(store, "library_stamp", lambda v=version: {"version": f"v{v}", "kernel_hash": "k",
                                                                       "candidates_hash": "c", "nvrtc": "n"})
        assert autotune.TuneCache().store([fake_result(k) for k in keys], H100)
        assert isolated_cache.stat().st_size <= 20_000
        autotune.TuneCache._memo.clear()
        assert all(autotune.TuneCache().lookup(k) is not None for k in keys)
    kept = json.loads(isolated_cache.read_text())["other_versions"]
    assert 0 < len(kept) < 5 and "v4|k|c|n" in kept  # the newest others stay


def test_this_versions_table_with_entries_not_an_object_is_named_so(isolated_cache):
    """Not called another version's "stale" table (its stamps were the same on both sides)."""
    autotune.TuneCache().store([fake_result()], H100)
    data = json.loads(isolated_cache.read_text())
    data["entries"] = [data["entries"]]
    isolated_cache.write_text(json.dumps(data))
    os.chmod(isolated_cache, 0o600)
    autotune.TuneCache._memo.clear()
    with pytest.warns(autotune.AutotuneCacheWarning, match="has this version's table, but its entries are not an object"):
        assert autotune.TuneCache().lookup(KEY) is None
    assert autotune.TuneCache().store([fake_result()], H100)
    autotune.TuneCache._memo.clear()
    assert autotune.TuneCache().lookup(KEY) is not None


def test_the_oldest_other_table_gives_way_with_a_warning_even_written_in_one_second(isolated_cache, monkeypatch):
    """Past KEEP_VERSIONS other versions the oldest table gives way, named in a warning; tables
    written in the same second keep the order they were written in (the last writer's was the
    one dropped)."""
    from fgcupy.autotune import store

    monkeypatch.setattr(store.time, "strftime", lambda fmt, *args: "2026-12-07T10:00:00+0000")
    for version in range(store.KEEP_VERSIONS + 2):
        monkeypatch.setattr(store, "library_stamp", lambda v=version: {"version": f"v{v}", "kernel_hash": "k",
                                                                       "candidates_hash": "c", "nvrtc": "n"})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert autotune.TuneCache().store([fake_result()], H100)
        gave_way = [str(w.message) for w in caught if "gave way" in str(w.message)]
        if version <= store.KEEP_VERSIONS:
            assert gave_way == []
        else:
            assert len(gave_way) == 1 and "the tables of 1 older versions gave way (v0|k|c|n)" in gave_way[0]
    data = json.loads(isolated_cache.read_text())
    assert data["header"]["version"] == f"v{store.KEEP_VERSIONS + 1}"
    assert sorted(data["other_versions"]) == sorted(f"v{v}|k|c|n" for v in range(1, store.KEEP_VERSIONS + 1))


def test_an_oversized_file_of_ours_is_replaced(isolated_cache, monkeypatch):
    from fgcupy.autotune import store

    isolated_cache.parent.mkdir(parents=True)
    isolated_cache.write_text(" " * 5000)
    monkeypatch.setattr(store, "MAX_FILE_BYTES", 4000)
    with pytest.warns(autotune.AutotuneCacheWarning, match=r"is larger than 4000 bytes .* will be replaced"):
        assert autotune.TuneCache().store([fake_result(KEY)], H100)
    autotune.TuneCache._memo.clear()
    assert autotune.TuneCache().lookup(KEY) is not None


def test_a_winner_not_compared_with_a_default_that_failed_to_run_is_not_stored():
    """The default fit but raised (say, out of memory on load): the fastest other kernel serves
    this process, but is not remembered as beating it."""
    default = autotune.heuristic_spec("bfloat16", 128, 128, "sm_80")
    a100 = autotune.DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912, 65536)
    key = autotune.ProblemKey.make(a100, "bfloat16", 128, 128, 4096, 4096, 0.3)

    def measure(specs, note):
        return {s: autotune.Measurement(None, note=note) if s == default else autotune.Measurement(2.0 + i * 0.1)
                for i, s in enumerate(specs)}

    crashed = autotune.tune(key, a100, lambda specs: measure(specs, "CUDADriverError: out of memory"),
                            compiler=fake_report())
    assert crashed.measured and not crashed.compared and not crashed.storable and crashed.winner != default
    wrong = autotune.tune(key, a100, lambda specs: measure(specs, "wrong result: rel L2 1e+00"), compiler=fake_report())
    assert wrong.measured and wrong.compared and wrong.storable


def test_tune_slice_names_bad_arguments_before_any_work():
    from fgcupy.autotune import tune_slice

    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))
    never = dict(attend=lambda *a: pytest.fail("attended"), timer=lambda fn, label=None: 1.0)
    for args, kwargs, message in [
        ((q, k[:, :1], v, 0.05), never, "q and k must agree on B, H and D"),
        ((q, k, v[:, :, :128], 0.05), never, r"v must match k"),
        ((q, k, v, 0.05), dict(never, refine=2.5), "refine must be a non-negative int"),
        ((q, k, v, 0.05), dict(never, refine=-1), "refine must be a non-negative int"),
        ((q, k, v, True), never, "target must be a positive relative L2 error"),
        ((q, k, v, 0.05), {}, "needs CUDA tensors"),  # the kernel, given host tensors
    ]:
        with pytest.raises(ValueError, match=message):
            tune_slice(*args, **kwargs)


def _fake_gpu_cli(monkeypatch, tmp_path):
    """The CLI on a pretend GPU whose tunes are recorded, not run."""
    from fgcupy.autotune import cli
    from fgcupy.autotune.candidates import heuristic_spec
    from fgcupy.autotune.keys import DeviceInfo
    from fgcupy.autotune.selection import TuneResult

    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(tmp_path / "cache"))
    tuned = []

    def fake_tune(key, device, q_len, kv_len, heads, **options):
        tuned.append(key.id)
        spec = heuristic_spec(key.dtype, key.head_dim, key.slice_m, key.arch)
        return TuneResult(key, spec, spec, True, [], 0.0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(DeviceInfo, "of", classmethod(lambda cls, device: DeviceInfo("Fake", (8, 0), 108, 166912, 65536)))
    monkeypatch.setattr(cli, "tune_on_device", fake_tune)
    return cli, tuned


def test_the_cli_tunes_each_density_bucket_once_and_keeps_its_json_as_it_goes(monkeypatch, tmp_path):
    cli, tuned = _fake_gpu_cli(monkeypatch, tmp_path)
    out = tmp_path / "out.json"
    assert cli.main(["--preset", "cogvideox5b", "--density", "0.3", "0.28", "0.25", "--slice-m", "64",
                     "--no-store", "--json", str(out)]) == 0
    assert len(tuned) == len(set(tuned)) >= 1  # 0.3, 0.28 and 0.25 share buckets: each tuned once
    assert len(json.loads(out.read_text())["results"]) == len(tuned)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_an_interrupted_json_write_leaves_the_last_whole_file(monkeypatch, tmp_path):
    """Each key's results replace the file whole: a run stopped inside a write keeps the file
    as the key before left it, never a cut-off one."""
    cli, tuned = _fake_gpu_cli(monkeypatch, tmp_path)
    out = tmp_path / "out.json"
    out.write_text('{"results": ["an earlier run"]}')
    writes = []

    def dump(obj, f, **options):
        writes.append(len(obj["results"]))
        if len(writes) == 2:  # the write after the first key: stopped half-way
            f.write('{"gpu": ')
            raise KeyboardInterrupt
        f.write(json.dumps(obj))

    monkeypatch.setattr(cli.json, "dump", dump)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--preset", "cogvideox5b", "--density", "0.3", "--slice-m", "64", "--no-store", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == []  # the check-write at the start, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_the_cli_refuses_an_unwritable_json_path_before_tuning(monkeypatch, tmp_path, capsys):
    cli, tuned = _fake_gpu_cli(monkeypatch, tmp_path)
    assert cli.main(["--preset", "cogvideox5b", "--density", "0.3", "--slice-m", "64", "--no-store",
                     "--json", str(tmp_path / "missing" / "out.json")]) == 2
    assert tuned == [] and "cannot write --json" in capsys.readouterr().err
    for no_file in ("", ".", "/"):  # "" is what --json "$OUT" gives with OUT unset
        assert cli.main(["--preset", "cogvideox5b", "--density", "0.3", "--slice-m", "64", "--no-store",
                         "--json", no_file]) == 2
        assert tuned == [] and "names no file" in capsys.readouterr().err


def test_the_cli_json_write_does_not_follow_a_link_planted_at_a_temporary_name(monkeypatch, tmp_path):
    cli, _ = _fake_gpu_cli(monkeypatch, tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    for pid in range(1, 5):  # the names a predictable scheme would pick
        (tmp_path / f".out.json.{pid}.tmp").symlink_to(victim)
    monkeypatch.setattr(cli.os, "getpid", lambda: 3)
    cli.main(["--preset", "cogvideox5b", "--density", "0.3", "--slice-m", "64", "--no-store",
              "--json", str(tmp_path / "out.json")])
    assert victim.read_text() == "keep me" and "results" in json.loads((tmp_path / "out.json").read_text())


# ---------------------------------------------------------------------------------------------
# the noise margin's edge, timings of no time, exact fits, failed tunes, fresh winners, keys
# ---------------------------------------------------------------------------------------------
def _tuned_result(key, winner):
    """A measured TuneResult whose ``winner`` beat the heuristic default of ``key`` two to one."""
    default = autotune.heuristic_spec(key.dtype, key.head_dim, key.slice_m, key.arch)
    cands = [autotune.Candidate(s, 100, s.smem_bytes, 0, ms, 1.0, "ok") for s, ms in ((default, 2.0), (winner, 1.0))]
    return autotune.TuneResult(key, default, winner, True, cands, 0.5)


def test_a_winner_exactly_at_the_margin_keeps_the_default():
    default, other = AttentionSpec("bfloat16", 128, 128, 32, 3), AttentionSpec("bfloat16", 128, 128, 64, 2)
    assert autotune.select_winner({default: 2.0, other: 1.0}, default, margin=0.5) == default
    assert autotune.select_winner({default: 2.0, other: 0.96875}, default, margin=0.5) == other


def test_select_winner_ignores_zero_and_negative_timings():
    default, other = AttentionSpec("bfloat16", 128, 128, 32, 3), AttentionSpec("bfloat16", 128, 128, 64, 2)
    assert autotune.select_winner({default: 1.0, other: 0.0}, default) == default
    assert autotune.select_winner({default: None, other: -1.0}, default) is None


def test_a_kernel_that_exactly_fills_the_gpus_shared_memory_is_used(isolated_cache):
    big = AttentionSpec("bfloat16", 128, 128, 64, 3)
    gpu = autotune.DeviceInfo("NVIDIA L40S", (8, 9), 142, big.smem_bytes, 65536)
    key = autotune.ProblemKey.make(gpu, "bfloat16", 128, 128, 32760, 32760, 0.3)
    autotune.TuneCache().store([_tuned_result(key, big)], gpu)
    default = autotune.heuristic_spec("bfloat16", 128, 128, gpu.arch)
    assert autotune.choose_spec(key, default, lambda k: None, gpu=gpu) == big


def test_a_failed_tune_is_not_tried_again_in_the_same_process(isolated_cache, monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    calls = []

    def tune_fn(key):
        calls.append(key)
        raise RuntimeError("out of memory")

    default = autotune.heuristic_spec("bfloat16", 128, 128, "sm_90")
    with pytest.warns(autotune.AutotuneCacheWarning, match="out of memory"):
        assert autotune.choose_spec(KEY, default, tune_fn) == default
    assert autotune.choose_spec(KEY, default, tune_fn) == default
    assert len(calls) == 1


def test_a_fresh_tune_replaces_the_stored_winner_of_its_key(isolated_cache):
    first, second = AttentionSpec("bfloat16", 128, 128, 32, 3), AttentionSpec("bfloat16", 128, 128, 64, 2)
    assert autotune.TuneCache().store([_tuned_result(KEY, first)], H100)
    assert autotune.TuneCache().store([_tuned_result(KEY, second)], H100)
    autotune.TuneCache._memo.clear()
    assert autotune.TuneCache().lookup(KEY) == second


def test_the_file_is_read_again_once_it_changed(isolated_cache):
    """Another writer's (here: a later store's) entries are seen without restarting."""
    winner = AttentionSpec("bfloat16", 128, 128, 32, 3)
    autotune.TuneCache().store([_tuned_result(KEY, winner)], H100)
    assert autotune.TuneCache().lookup(KEY) == winner
    other_key = autotune.ProblemKey.make(H100, "bfloat16", 128, 64, 32760, 32760, 1.0)
    other = AttentionSpec("bfloat16", 128, 64, 32, 2)
    autotune.TuneCache().store([_tuned_result(other_key, other)], H100)
    assert autotune.TuneCache().lookup(other_key) == other


def test_problem_keys_keep_query_and_key_lengths_apart():
    key = autotune.ProblemKey.make(H100, "bfloat16", 128, 128, 4096, 256, 0.3)
    assert (key.q_bucket, key.kv_bucket) == (4096, 256)
    assert "|q4096|kv256|" in key.id


def test_density_estimate_of_a_mask_with_spare_capacity_is_at_most_one():
    indptr = torch.tensor([[[0, 4]]], dtype=torch.int32)
    mask = SliceMask(indptr, torch.arange(8, dtype=torch.int32) % 4, 64, 64, 4)  # 8 slots, 4 slices
    assert autotune.mask_density_estimate(mask) == 1.0
