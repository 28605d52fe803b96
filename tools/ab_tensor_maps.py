"""A/B in one process: the warp-specialised kernel with key tiles that are one contiguous run
loaded by the tensor-memory accelerator (the default) and with every tile gathered (tensor maps
withheld), wan14b-480p, beside SDPA cuDNN dense (GPU, Hopper):

    python -m tools.ab_tensor_maps
"""

import torch

import fgcupy.attention_kernel as attention_kernel
from bench.cases import random_inputs, random_topk_mask, sdpa_call, window_mask
from fgcupy import SliceMask, SparseAttention
from fgcupy.timing import cuda_time_ms

B, H, S, D = 1, 40, 32760, 128


def centred_window(density: float) -> SliceMask:
    """Each 128-query block keeps the keys within density * S / 2 of its centre."""
    return window_mask(B, H, S, 128, int(density * S / 2))


def main() -> None:
    q, k, v = random_inputs(B, H, S, D)
    with_maps = attention_kernel.rows_tensor_map
    print(torch.cuda.get_device_name(), "| wan14b-480p", (B, H, S, D))
    cudnn = cuda_time_ms(sdpa_call(q, k, v, "cudnn"), reps=10)["median_ms"]
    print(f"sdpa-cudnn dense {cudnn:.2f} ms")
    masks = {"dense": SliceMask.full(B, H, S, S, 128, device="cuda"), "window 0.3": centred_window(0.3),
             "window 0.1": centred_window(0.1), "random 0.3": random_topk_mask(B, H, S, S, 128, 0.3),
             "random 0.1": random_topk_mask(B, H, S, S, 128, 0.1)}
    out = torch.empty_like(q)
    for name, mask in masks.items():
        density = mask.density()
        plan = SparseAttention().plan(mask, head_dim=D, dtype=q.dtype)
        times = {"tma": [], "gather": []}
        for _ in range(2):  # alternate, so drift hits both
            for mode in times:
                attention_kernel.rows_tensor_map = with_maps if mode == "tma" else (lambda t, rows: None)
                times[mode].append(cuda_time_ms(lambda: plan.run(q, k, v, out=out), reps=10)["median_ms"])
        attention_kernel.rows_tensor_map = with_maps
        t, g = min(times["tma"]), min(times["gather"])
        print(f"{name:11s} density {density:.3f} | {plan.spec.name} | TMA runs {t:.2f} ms ({t / (density * cudnn):.3f} x "
              f"d x cuDNN) | all gathered {g:.2f} ms ({g / (density * cudnn):.3f} x) | runs {times['tma']} "
              f"gathered {times['gather']}")


if __name__ == "__main__":
    main()
