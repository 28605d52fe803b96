"""fgcupy.device_constants: index tensors made once per shape and kept (CPU; the CUDA-graph
branch through a stand-in for the capture check)."""

import subprocess
import sys

import pytest
import torch

from fgcupy import device_constants
from fgcupy.device_constants import device_constant


def test_a_constant_is_built_once_per_key_and_device(monkeypatch):
    monkeypatch.setattr(device_constants, "_KEPT", {})
    built = []

    def build(on):
        built.append(on)
        return torch.arange(4, device=on), 2.5

    first = device_constant(("k", 4), "cpu", build)
    again = device_constant(("k", 4), torch.device("cpu"), build)
    other = device_constant(("k", 5), "cpu", build)
    assert again[0] is first[0] and first[1] == 2.5 and other[0] is not first[0]
    assert built == [torch.device("cpu")] * 2 and first[0].tolist() == [0, 1, 2, 3]


def test_a_constant_made_in_inference_mode_can_be_saved_for_backward(monkeypatch):
    """Kept tensors outlive the first call's mode: one made under inference_mode must still
    serve a later call that autograd records (an index_select saves its indices)."""
    monkeypatch.setattr(device_constants, "_KEPT", {})
    with torch.inference_mode():
        positions = device_constant("positions", "cpu", lambda on: torch.tensor([0, 2], device=on))
    assert not positions.is_inference()
    k = torch.randn(3, 4, requires_grad=True)
    k.index_select(0, positions).sum().backward()
    assert k.grad[1].abs().sum() == 0 and k.grad[0].abs().sum() > 0


def test_while_a_stream_is_captured_the_constant_is_made_there_and_not_kept(monkeypatch):
    monkeypatch.setattr(device_constants, "_KEPT", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    built = []
    for _ in range(2):
        device_constant("captured", "cuda:0", lambda on: built.append(on) or 7)
    assert built == [torch.device("cuda:0")] * 2 and device_constants._KEPT == {}


def test_while_a_stream_is_captured_a_kept_constant_is_read(monkeypatch):
    monkeypatch.setattr(device_constants, "_KEPT", {("kept", torch.device("cuda:0")): 5})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert device_constant("kept", "cuda:0", lambda on: pytest.fail("built again")) == 5


def test_cuda_constants_are_made_on_the_module_s_own_thread(monkeypatch):
    """A CUDA graph tree routes every allocation of the calling thread into its pool during
    warm-up, so CUDA constants must be made on another thread (CPU ones need not be)."""
    import threading

    monkeypatch.setattr(device_constants, "_KEPT", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(device_constants, "_made", lambda device, build: threading.current_thread())
    made_on = device_constant("thread", "cuda:0", lambda on: None)
    assert made_on is not threading.current_thread() and made_on.name.startswith("fgcupy-device-constants")
    assert device_constant("thread", "cpu", lambda on: None) is threading.current_thread()


def test_importing_fgcupy_leaves_dynamo_unimported():
    """The ops' kernels turn torch.compile off only once dynamo is loaded, so the import stays light."""
    out = subprocess.run([sys.executable, "-c", "import sys, fgcupy; print('torch._dynamo' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
def test_the_estimates_sample_stays_right_under_cuda_graph_trees():
    """Made during reduce-overhead's warm-up (ops run eagerly there, into the graph's pool), the
    kept sample holds its values after graphs of two lengths are recorded and replayed, and the
    graphs' masks are the eager ones."""
    from fgcupy import predict_mask
    from fgcupy.lse_estimate import ESTIMATE_BAND, _band_sample_ranges, _sample_plan, sample_positions

    def step(q, k):
        return predict_mask(q, k, 128, "colmax", lse="estimate", density=0.2).indices

    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    inputs = {seq: tuple(torch.randn(1, 2, seq, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
              for seq in (4096, 6144)}
    for seq in (4096, 6144, 4096, 6144):
        for _ in range(3):
            got = compiled(*inputs[seq]).clone()
        assert torch.equal(got, step(*inputs[seq]))
    for seq in inputs:
        positions, ranges, _ = _sample_plan(seq, seq // 128, 128, ESTIMATE_BAND, torch.device("cuda"))
        assert torch.equal(positions.cpu(), sample_positions(seq))
        assert torch.equal(ranges.cpu(), _band_sample_ranges(seq // 128, 128, ESTIMATE_BAND, seq, torch.device("cpu")))
