"""End to end through diffusers: Wan 2.1 14B-sized transformer blocks with the stock processor
(SDPA) against fgcupy's processor, and a reduced-depth full model over a few simulated steps.

    PYTHONPATH=. python -m bench.bench_e2e [--seqs 32760 75600] [--density 0.1] [--json out.json]

1. Per block (hidden 5120, 40 heads x 128, FFN 13824, random weights, bf16), per sequence length:
   the stock block; fgcupy's block on a reused mask and on a refresh step (predict + plan + run);
   the attention call alone (stock SDPA dispatch vs the fgcupy plan) for the attention share; and
   the time per block averaged over a ``--steps`` schedule (dense warm-up steps run stock, refresh
   steps pay the prediction), with the speedup over stock; and what a refresh adds measured a
   second way, as the median over back-to-back pairs of a refresh call and a reuse call. The
   schedule is SparseAttentionConfig's default (one dense step, or ``--dense-steps``; with warm-up
   steps: the warm-up's exact mask, sparse refreshes every 20; without: a predicted mask,
   searching refreshes on sparse steps 1, 2, 4, 8, 16, then every 32) unless the flags say
   otherwise.
2. A ``--model-layers``-deep WanTransformer3DModel of the same width over ``--model-steps``
   Euler steps of a flow-matching-like loop, dense then sparse from the same start: time per
   forward, the PSNR of each step's output against the dense run, the masks' memory (held compactly
   or expanded: ``--compact-masks``) and the sparse run's peak memory. Random weights attend almost
   uniformly, so this PSNR is a plumbing check, not a quality claim (bench/ quality numbers come
   from the video-like workloads).
CUDA-event medians after warm-up; everything in one process on one GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from bench.cases import random_topk_mask
from bench.presets import PRESETS
from bench.timing import cuda_time_ms
from fgcupy.integrations import diffusers as fd

WAN14B = dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, ffn_dim=13824, patch_size=(1, 2, 2))
GRIDS = {32_760: PRESETS["wan14b-480p"].grid, 75_600: PRESETS["wan14b-720p"].grid}
TEXT_TOKENS = 512
DEVICE = "cuda"


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """dB, the peak being the reference's value range."""
    output, reference = output.double(), reference.double()
    mse = float(torch.mean((output - reference) ** 2))
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def build_wan(layers: int, dtype=torch.bfloat16):
    """Random weights in ``dtype``, except the modules diffusers keeps in float32 when a pipeline
    loads in bf16 (rotary tables, time embedder, norms, modulation): as ``from_pretrained`` does."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = WanTransformer3DModel(num_layers=layers, **WAN14B)
    keep = set(model._keep_in_fp32_modules or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model.eval()


def make_predictor(name: str, density: float, tau: float):
    """'topk' (at ``density``) / 'tau' (mass ``tau``): fgcupy.predict_mask; 'colmax': the exact
    schedule (column-max top-k at ``density`` from each refresh's dense LSE); 'random': uniform random
    keys at ``density`` (the same work for the kernel, next to no prediction cost); 'auto': topk
    where fgcupy has predict_mask, else random."""
    if name == "auto":
        import fgcupy

        name = "topk" if hasattr(fgcupy, "predict_mask") else "random"
    if name == "random":
        calls = iter(range(1 << 30))  # a fresh draw each refresh and layer (one seed repeated one mask)

        def random_keys(q, k, slice_m):
            batch, heads, q_len, _ = q.shape
            return random_topk_mask(batch, heads, q_len, k.shape[2], slice_m, density, seed=next(calls),
                                    device=q.device)

        return "random", dict(predictor=random_keys)
    if name == "tau":
        return name, dict(predictor="tau", tau=tau, density=None)
    return name, dict(predictor=name, density=density)


def latent_shape(seq: int):
    frames, height, width = GRIDS[seq]
    return (1, 16, frames, 2 * height, 2 * width)


def schedule_counts(config: fd.SparseAttentionConfig, steps: int):
    dense = sum(config.is_dense_step(s) for s in range(steps))
    refresh = sum(config.is_refresh_step(s) for s in range(steps))
    return dense, refresh, steps - dense - refresh


def block_call(model, seq: int):
    """A no-grad call of ``model``'s first block on random hidden states of ``seq`` tokens, with
    the model's rotary embedding, text context and timestep embedding."""
    block = model.blocks[0]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    with torch.no_grad():
        rotary = model.rope(torch.empty(latent_shape(seq), device=DEVICE, dtype=torch.bfloat16))
        text = torch.randn(1, TEXT_TOKENS, WAN14B["text_dim"], generator=gen, device=DEVICE, dtype=torch.bfloat16)
        _, temb, context, _ = model.condition_embedder(torch.tensor([500.0], device=DEVICE), text)
        temb = temb.unflatten(1, (6, -1))
        width = WAN14B["num_attention_heads"] * WAN14B["attention_head_dim"]
        hidden = torch.randn(1, seq, width, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    assert rotary[0].shape[1] == seq, (rotary[0].shape, seq)

    def run_block():
        with torch.no_grad():
            return block(hidden, context, temb, rotary)

    return run_block


def paired_refresh_overhead_ms(model, run_block, args, predictor: dict) -> float:
    """Median over pairs of (a refresh call - the reuse call right after it), from a schedule
    that refreshes every other step. The two calls of a pair run back to back, so the GPU's
    clocks, which move between two separately timed medians, cancel: a refresh adds about 4 ms
    to a 50 ms block call at 32,760 tokens, and the difference of the medians scatters by about
    a tenth of that from run to run. Which calls refreshed is read from the layer's count."""
    handle = fd.apply(model, fd.SparseAttentionConfig(slice_m=args.slice_m, dense_steps=0, refresh_every=2,
                                                      refresh_on_missed_mass=args.refresh_on_missed_mass, **predictor))
    calls = []  # (ms, refreshed)
    host_ms = 0.0  # the longest host time of a call so far: the queued lead covers it
    for step in range(2 * (args.warmup + args.reps) + 4):
        handle.set_step(step)
        before = handle.refresh_counts()["blocks.0.attn1"]
        timed = cuda_time_ms(run_block, warmup=0, reps=1, queued=args.queued, host_ms=host_ms)
        host_ms = max(host_ms, timed["host_ms"])
        calls.append((timed["median_ms"], handle.refresh_counts()["blocks.0.attn1"] > before))
    differences = [a[0] - b[0] for a, b in zip(calls, calls[1:]) if a[1] and not b[1]][args.warmup:]
    if len(differences) < args.reps:
        raise RuntimeError(f"expected {args.reps} refresh/reuse pairs, got {len(differences)}: {calls}")
    return statistics.median(differences[: args.reps])


def bench_block(seq: int, args, predictor: dict) -> dict:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if predictor.get("local_search"):  # the block is called alone: no transformer call to read the grid from
        predictor = dict(predictor, grid=GRIDS[seq])

    model = build_wan(1)
    run_block = block_call(model, seq)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    reps = dict(warmup=args.warmup, reps=args.reps, queued=args.queued)
    stock = cuda_time_ms(run_block, **reps)["median_ms"]
    heads, head_dim = WAN14B["num_attention_heads"], WAN14B["attention_head_dim"]
    q, k, v = (torch.randn(1, seq, heads, head_dim, generator=gen, device=DEVICE, dtype=torch.bfloat16)
               for _ in range(3))
    stock_attn = cuda_time_ms(lambda: dispatch_attention_fn(q, k, v), **reps)["median_ms"]

    # Reused mask: the first call predicts, later calls of later steps reuse.
    reuse_cfg = fd.SparseAttentionConfig(slice_m=args.slice_m, dense_steps=0, refresh_every=10**9, compact_masks=False,
                                         refresh_on_missed_mass=args.refresh_on_missed_mass, **predictor)
    handle = fd.apply(model, reuse_cfg)
    started = time.perf_counter()
    run_block()
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - started
    handle.set_step(1)
    reuse = cuda_time_ms(run_block, **reps)["median_ms"]
    plan = handle.layers["blocks.0.attn1"].slots[0].plan
    density = plan.mask.density()
    sparse_attn = cuda_time_ms(lambda: plan.run(q, k, v, layout="NHD"), **reps)["median_ms"]

    # Every call a refresh step: prediction + plan + run.
    handle = fd.apply(model, fd.SparseAttentionConfig(slice_m=args.slice_m, dense_steps=0, refresh_every=1, **predictor))
    steps = iter(range(10**9))

    def refresh_block():
        handle.set_step(next(steps))
        return run_block()

    refresh = cuda_time_ms(refresh_block, **reps)["median_ms"]
    assert handle.refresh_counts()["blocks.0.attn1"] == args.warmup + args.reps
    # A calibrated schedule's first refresh also predicts with every candidate pooling and reads
    # sampled queries' softmax rows.
    calibrate = refresh
    if predictor.get("calibrate_pooling"):
        def calibrating_block():
            handle.reset(recalibrate=True)
            return run_block()

        calibrate = cuda_time_ms(calibrating_block, **reps)["median_ms"]
    paired = paired_refresh_overhead_ms(model, run_block, args, predictor)
    fd.remove(model)

    # mask_from_warmup: the last warm-up step runs dense through fgcupy and makes the exact mask.
    warmup_mask = stock
    if args.mask_from_warmup:
        handle = fd.apply(model, fd.SparseAttentionConfig(slice_m=args.slice_m, dense_steps=args.dense_steps,
                                                          mask_from_warmup=True, **predictor))

        def warmup_mask_block():
            handle.reset()
            handle.set_step(args.dense_steps - 1)
            return run_block()

        warmup_mask = cuda_time_ms(warmup_mask_block, **reps)["median_ms"]
        assert handle.stats()["blocks.0.attn1"].refresh_steps == [args.dense_steps - 1] * (args.warmup + args.reps)
        fd.remove(model)

    schedule = fd.SparseAttentionConfig(dense_steps=args.dense_steps, refresh_every=args.refresh_every,
                                        refresh_ramp=args.refresh_ramp, mask_from_warmup=args.mask_from_warmup, **predictor)
    n_dense, n_refresh, n_reuse = schedule_counts(schedule, args.steps)
    refresh_total = (calibrate + (n_refresh - 1) * refresh) if n_refresh else 0.0
    warmup_extra = warmup_mask - stock
    amortised = (n_dense * stock + warmup_extra + refresh_total + n_reuse * reuse) / args.steps
    # per step, of stock attention
    mask_share = (warmup_extra + refresh_total - n_refresh * reuse) / args.steps / stock_attn
    # Later generations keep the calibrated poolings: every refresh is a plain one.
    later_share = n_refresh * (refresh - reuse) / args.steps / stock_attn
    paired_share = n_refresh * paired / args.steps / stock_attn  # the plain refreshes' share, paired
    row = dict(seq=seq, density=density, stock_block_ms=stock, stock_attention_ms=stock_attn,
               stock_attention_share=stock_attn / stock, fgcupy_reuse_block_ms=reuse,
               fgcupy_refresh_block_ms=refresh, refresh_overhead_ms=refresh - reuse, calibrating_refresh_block_ms=calibrate,
               warmup_mask_block_ms=warmup_mask if args.mask_from_warmup else None,
               fgcupy_attention_ms=sparse_attn, fgcupy_attention_share=sparse_attn / reuse,
               schedule=dict(steps=args.steps, dense=n_dense, refresh=n_refresh, reuse=n_reuse),
               amortised_block_ms=amortised, speedup_steady=stock / reuse, speedup_amortised=stock / amortised,
               attention_speedup=stock_attn / sparse_attn, first_call_s=first_call_s,
               amortised_mask_share=mask_share, later_generations_mask_share=later_share,
               paired_refresh_overhead_ms=paired, paired_refresh_share=paired_share)
    print(f"seq {seq:6d}  density {density:.3f}  block: stock {stock:7.2f} ms (attention {stock_attn:7.2f} ms, "
          f"{100 * stock_attn / stock:4.1f} %) | fgcupy reuse {reuse:7.2f} ms (attention {sparse_attn:7.2f} ms, "
          f"{100 * sparse_attn / reuse:4.1f} %), refresh {refresh:7.2f} ms"
          + (f" (calibrating {calibrate:7.2f} ms)" if calibrate != refresh else "")
          + (f", warm-up step making the exact mask {warmup_mask:7.2f} ms" if args.mask_from_warmup else "")
          + f" | {args.steps}-step average "
          f"{amortised:7.2f} ms -> x{stock / amortised:.2f} (steady x{stock / reuse:.2f}); refresh cost per step "
          f"{100 * mask_share:.1f} % of stock attention"
          + (f" ({100 * later_share:.1f} % in later generations)" if calibrate != refresh else "")
          + f"; paired calls: a refresh adds {paired:.2f} ms, {100 * paired_share:.1f} % per step", flush=True)
    del model, run_block, handle, plan, q, k, v
    torch.cuda.empty_cache()
    return row


def bench_model(args, predictor: dict) -> dict:
    """Dense then sparse over the same simulated steps; per-step forward time and output PSNR."""
    seq = args.model_seq
    model = build_wan(args.model_layers)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    start = torch.randn(latent_shape(seq), generator=gen, device=DEVICE, dtype=torch.bfloat16)
    text = torch.randn(1, TEXT_TOKENS, WAN14B["text_dim"], generator=gen, device=DEVICE, dtype=torch.bfloat16)
    timesteps = torch.linspace(999, 0, args.model_steps + 1)[:-1]
    dt = 1.0 / args.model_steps

    def trajectory():
        latents, outs, times = start.clone(), [], []
        with torch.no_grad():
            for t in timesteps:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                out = model(latents, t.view(1).to(DEVICE), text).sample
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
                outs.append(out.float())
                latents = latents - dt * out
        return outs, times, latents.float()

    trajectory()  # warm-up (kernels, allocator)
    dense_out, dense_ms, dense_final = trajectory()
    config = fd.SparseAttentionConfig(slice_m=args.slice_m, dense_steps=args.model_dense_steps,
                                      refresh_every=args.model_refresh_every, compact_masks=args.compact_masks, **predictor)
    handle = fd.apply(model, config)
    trajectory()  # warm-up: compiles, predicts
    handle.reset(clear_stats=True)
    torch.cuda.reset_peak_memory_stats()
    sparse_out, sparse_ms, sparse_final = trajectory()
    peak_gib, mask_gib, compact = torch.cuda.max_memory_allocated() / 2**30, handle.mask_memory_bytes() / 2**30, handle.compact_masks
    refreshes = handle.refresh_counts()
    fd.remove(model)
    row = dict(seq=seq, layers=args.model_layers, steps=args.model_steps, dense_steps=args.model_dense_steps,
               refresh_every=args.model_refresh_every, dense_ms=dense_ms, sparse_ms=sparse_ms,
               psnr_db=[psnr(s, d) for s, d in zip(sparse_out, dense_out)],
               final_latent_psnr_db=psnr(sparse_final, dense_final),
               refreshes_per_layer=sorted(set(refreshes.values())), compact_masks=compact, mask_gib=mask_gib,
               peak_gib=peak_gib)
    print(f"model {args.model_layers} layers x {seq} tokens, {args.model_steps} steps: dense "
          f"{[round(x, 1) for x in dense_ms]} ms, sparse {[round(x, 1) for x in sparse_ms]} ms, output PSNR "
          f"{[round(x, 1) for x in row['psnr_db']]} dB, final latents {row['final_latent_psnr_db']:.1f} dB; masks "
          f"{'compact' if compact else 'expanded'} {mask_gib:.2f} GiB, peak memory of the sparse run {peak_gib:.2f} GiB",
          flush=True)
    del model
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="*", default=[32_760, 75_600], choices=sorted(GRIDS),
                        help="block lengths (none: the model part only)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--predictor", default="auto", choices=["auto", "topk", "tau", "colmax", "random"],
                        help="colmax: the exact schedule (a refresh runs dense attention and its column max)")
    parser.add_argument("--tau", type=float, default=0.9, help="probability mass kept by --predictor tau")
    parser.add_argument("--calibrate", action="store_true",
                        help="with --predictor topk: calibrate_pooling=True (a layer's first refresh picks per-head "
                             "poolings from sampled queries; the calibrating refresh is timed apart)")
    parser.add_argument("--mask-from-warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="mask_from_warmup: the last dense warm-up step makes the exact column-max mask the "
                             "first sparse step uses (timed apart); default: SparseAttentionConfig's")
    parser.add_argument("--sparse-refresh", action=argparse.BooleanOptionalAction, default=None,
                        help="sparse_refresh: a refresh attends through the layer's mask and makes the next one "
                             "from the exact column max over its keys and the predictor's (--predictor topk or tau); "
                             "default: SparseAttentionConfig's")
    parser.add_argument("--local-search", action=argparse.BooleanOptionalAction, default=None,
                        help="with sparse refreshes: local_search (the old mask's keys moved along the token grid are "
                             "candidates too); default: SparseAttentionConfig's")
    parser.add_argument("--search-only", action="store_true",
                        help="with local search: predict_on_refresh=False (a refresh scores the old keys and their "
                             "moved copies only); without it, SparseAttentionConfig's default")
    parser.add_argument("--slice-m", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="schedule length the refresh cost is spread over")
    parser.add_argument("--dense-steps", type=int, default=None, help="default: SparseAttentionConfig's")
    parser.add_argument("--refresh-every", type=int, default=None, help="default: SparseAttentionConfig's")
    parser.add_argument("--refresh-ramp", action=argparse.BooleanOptionalAction, default=None,
                        help="also refresh on sparse steps 1, 2, 4, ... below the interval (default: "
                             "SparseAttentionConfig's)")
    parser.add_argument("--refresh-on-missed-mass", type=float, default=None,
                        help="SparseAttentionConfig(refresh_on_missed_mass=...): reuse steps also read the mask's recall "
                             "(their time includes the reading; the refreshes it adds depend on the data)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--queued", action="store_true",
                        help="time the block calls as queued GPU time (the host runs ahead, as in a model) "
                             "instead of isolated calls that start on an idle GPU (fgcupy.timing)")
    parser.add_argument("--model-seq", type=int, default=32_760, choices=sorted(GRIDS))
    parser.add_argument("--model-layers", type=int, default=4, help="0 skips the full-model part")
    parser.add_argument("--model-steps", type=int, default=4)
    parser.add_argument("--model-dense-steps", type=int, default=1)
    parser.add_argument("--model-refresh-every", type=int, default=2)
    parser.add_argument("--compact-masks", action=argparse.BooleanOptionalAction, default=None,
                        help="the model's SparseAttentionConfig(compact_masks=...); default: its own choice")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not fd.kernel_available():
        raise SystemExit("bench_e2e needs a CUDA GPU that fgcupy's kernels can run on")

    started = time.perf_counter()
    name, predictor = make_predictor(args.predictor, args.density, args.tau)
    if args.calibrate:
        if name != "topk":
            parser.error("--calibrate needs --predictor topk")
        name, predictor = "topk, calibrated poolings", dict(predictor, calibrate_pooling=True)
    try:  # the schedule SparseAttentionConfig makes of these flags (None: its defaults); it refuses what cannot work
        schedule = fd.SparseAttentionConfig(dense_steps=args.dense_steps, refresh_every=args.refresh_every,
                                            refresh_ramp=args.refresh_ramp, refresh_on_missed_mass=args.refresh_on_missed_mass,
                                            mask_from_warmup=args.mask_from_warmup, sparse_refresh=args.sparse_refresh,
                                            local_search=args.local_search,
                                            predict_on_refresh=False if args.search_only else None,
                                            **predictor)
    except ValueError as error:
        parser.error(str(error))
    # the model runs its own schedule (--model-dense-steps ...): the flags as given, resolved there
    model_predictor = dict(predictor, mask_from_warmup=args.mask_from_warmup, sparse_refresh=args.sparse_refresh,
                           local_search=args.local_search, predict_on_refresh=False if args.search_only else None,
                           refresh_on_missed_mass=args.refresh_on_missed_mass)
    if args.model_layers > 0:  # refused now, not after the block's timings
        try:
            fd.SparseAttentionConfig(slice_m=args.slice_m, dense_steps=args.model_dense_steps,
                                     refresh_every=args.model_refresh_every, **model_predictor)
        except ValueError as error:
            parser.error(f"the model's schedule (--model-dense-steps {args.model_dense_steps}): {error}")
    args.mask_from_warmup, args.refresh_every = schedule.mask_from_warmup, schedule.refresh_every
    args.refresh_ramp, args.dense_steps = schedule.refresh_ramp, schedule.dense_steps
    refresh = {key: getattr(schedule, key) for key in ("sparse_refresh", "local_search", "predict_on_refresh")}
    predictor = dict(predictor, **refresh)  # the block's refresh calls are timed as the schedule makes them
    name += ((", sparse refresh" if schedule.sparse_refresh else "") + (" + local search" if schedule.local_search else "")
             + ("" if schedule.predict_on_refresh else ", no prediction"))
    header = (f"{torch.cuda.get_device_name()} | torch {torch.__version__} | diffusers "
              f"{__import__('diffusers').__version__} | predictor {name} | "
              f"{f'tau {args.tau}' if args.predictor == 'tau' else f'target density {args.density}'} | "
              f"{'queued GPU time' if args.queued else 'isolated calls'}")
    print(header, flush=True)
    print("(random weights attend almost uniformly: the PSNR below checks plumbing, not quality)", flush=True)
    blocks = [bench_block(seq, args, predictor) for seq in args.seqs]
    model = bench_model(args, model_predictor) if args.model_layers > 0 else None

    print("\n" + header)
    print(f"Wan 2.1 14B block (5120 hidden, 40x128 heads, FFN 13824, bf16), {args.steps}-step schedule: "
          f"{args.dense_steps} dense warm-up steps"
          + (" (the last making exact masks)" if args.mask_from_warmup else "") + f", refresh every {args.refresh_every}"
          + (" after sparse steps 1, 2, 4, ... below it (the ramp)" if args.refresh_ramp else ""))
    print("| tokens | density | stock block ms | attention share | fgcupy block ms (reuse / refresh) "
          "| attention share | avg over schedule ms | speedup (avg / steady) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in blocks:
        print(f"| {r['seq']:,} | {r['density']:.3f} | {r['stock_block_ms']:.1f} "
              f"| {100 * r['stock_attention_share']:.0f} % "
              f"| {r['fgcupy_reuse_block_ms']:.1f} / {r['fgcupy_refresh_block_ms']:.1f} "
              f"| {100 * r['fgcupy_attention_share']:.0f} % | {r['amortised_block_ms']:.1f} "
              f"| x{r['speedup_amortised']:.2f} / x{r['speedup_steady']:.2f} |")
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, args=vars(args), blocks=blocks, model=model, seconds=elapsed), f, indent=1)


if __name__ == "__main__":
    main()
