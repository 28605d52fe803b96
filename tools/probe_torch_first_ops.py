"""What each torch CUDA op costs the first time a process uses it (its kernels load lazily), and
the second time; the ops fgcupy's first call and a full mask use (GPU):

    python -m tools.probe_torch_first_ops
"""

import time

import torch

def t(name, fn):
    times = []
    for _ in range(2):
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"{name:28s} first {1e3 * times[0]:7.2f} ms  second {1e3 * times[1]:6.3f} ms")
    return result


def main() -> None:
    torch.randn(1, 2, 1024, 128, device="cuda", dtype=torch.bfloat16)  # the context and one kernel, as a model has
    torch.cuda.synchronize()
    x = t("arange int32", lambda: torch.arange(1024, dtype=torch.int32, device="cuda"))
    t("repeat", lambda: x.repeat(16))
    t("mul int32", lambda: x * 7)
    w = t("sub int32 (slices)", lambda: x[1:] - x[:-1])
    t("argsort stable desc", lambda: torch.argsort(w, descending=True, stable=True))
    t("sort", lambda: torch.sort(w, descending=True, stable=True))
    t("to int32 from int64", lambda: torch.arange(16, device="cuda").to(torch.int32))
    t("cumsum", lambda: torch.cumsum(w, 0))
    t("empty", lambda: torch.empty(100, device="cuda"))
    t("fill", lambda: torch.empty(100, device="cuda").fill_(1))


if __name__ == "__main__":
    main()
