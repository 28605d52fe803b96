"""Mask prediction: score (cuda_src/mask_score.cu) and select (mask_select.cu) into a SliceMask.

Methods:
  "auto" (the default; fgcupy.auto_mask): "topk" checked per head on a few query blocks against
      their best mask, the estimated column max on the heads it fails; waits on the host.
  "topk" / "tau" / "threshold": mean-query scoring. Each query block's mean query (or, with
      ``pool`` < slice_m, each sub-block's) against every key; selection by top-k, by the
      smallest set holding a fraction tau of the block's summed scores (scores, not attention
      mass: a key's score is its highest probability over the block's pooled rows, so the
      attention mass the set keeps can be well below tau on heads whose queries look apart),
      or by probability >= threshold.
      Sub-blocks are combined by ``combine="max"`` (max over sub-blocks of their softmax
      probabilities, then one selection per block) or ``"union"`` (one selection per
      sub-block, union per block).
  "colmax": exact column-max scores from a dense step's row LSE (``lse`` [B, H, S], natural
      log, as ``SparseAttention.run(..., return_lse=True)`` gives): score(block, key) = max over
      the block's queries of their probability; selection by ``rule`` (default threshold,
      0.5 / kv_len). Tiled on the GPU; the S x S matrix is never stored. With no dense step,
      ``lse="estimate"`` uses fgcupy.lse_estimate (each query's band mass plus its sampled mass
      outside the band).
Every selection can keep at least ``min_keys``, at most ``max_keys`` keys per block, and the
block's diagonal band (its own keys and ``local`` more on either side), which is ranked first
(it counts toward k and toward the mass; with combine "union" each sub-block selects without it
and the band joins their union, so a block's union can hold more than k keys). Exact
definitions: fgcupy.mask_reference.

The default scores are probabilities (pooled sub-blocks with the exact band). With one
mean query per block (``pool=None, exact_band=None``), or combine "union", logits are stored
between scoring and selection, as float16 for top-k and threshold unless ``logits_dtype`` says
otherwise: half the memory traffic of float32 (see notes/MEASURED.md for the times),
and the selection is exact on the stored values: rounding moves a logit by at most 2^-11 of
its size, so only keys that nearly tie (or sit at the threshold) can change sides, and a logit
beyond +-65504 becomes +-inf (ranked first or last, ties by index; kept or dropped by a
threshold). Tau keeps float32 logits by default, since its masses would be meaningless past
float16's range; ``logits_dtype`` chooses either explicitly. Probabilities (colmax, pooled
max) are stored as bfloat16 rounded toward zero (mask_reference.stored_probs; the reference
rounds them the same way): half the traffic of float32 in the dilation and selection passes,
and every probability keeps 8 significant bits, so keys only trade places with keys scoring
within 2^-7 of them.

Host synchronisation: "auto" waits once (twice where a head is flagged); none for top-k with
combine "max" (row sizes are known from the shapes); the other selections need one (in all) to
size the index buffer unless ``max_keys`` is given. Score buffers ([heads x rows x kv_len],
rows padded to 128 bytes) are bounded by ``workspace_bytes``: heads are processed in chunks.
Those selections also keep a bitmask of each block's (each sub-block's with "union") kept keys
until the buffer is sized; where every head's bitmasks would outgrow ``workspace_bytes`` each
chunk is written out before the next is scored (one host sync per chunk unless ``max_keys`` is
given).
"""

from __future__ import annotations

import inspect

import torch

from . import auto_mask, bridge, predict_op
from .gpu_prediction import DEFAULT_WORKSPACE, kept_slices, static_row_counts  # noqa: F401
from .jit.spec import SLICE_SIZES
from .layout import query_key_views
from .lse_estimate import estimate_lse
from .mask import SliceMask, num_blocks
from .mask_request import (AUTO, AUTO_OPTIONS, COMBINES, DEFAULT_EXACT_BAND, DEFAULT_METHOD, DEFAULT_POOL,  # noqa: F401
                           EXACT_BAND_SLICES, METHODS, POOLINGS, PREDICT_METHODS, MaskRequest, auto_refusal,
                           ONE_KEY, check_auto_column_max, check_method, check_options, check_products,
                           check_workspace_bytes,
                           checked_candidates, checked_lse, make_request, options_auto_refuses, resolved_products)
from .attention_kernel import check_scale
from .op_library import define, pack_csr, packed_csr_empty, unpack_csr


@torch.no_grad()  # a mask of integer indices: nothing to differentiate, whatever q and k need
def predict_mask(q, k, slice_m: int = 128, method: str = DEFAULT_METHOD, *, density: float | None = None,
                 top_k: int | None = None, tau: float | None = None, threshold: float | None = None,
                 rule: str | None = None, pool=AUTO, combine: str = "max", min_keys: int | None = None,
                 max_keys: int | None = None, local: int | None = None, lse=None, scale: float | None = None,
                 logits_dtype: torch.dtype | None = None, exact_band=AUTO, pooling=AUTO, diagonals=(),
                 candidates=None, products=AUTO, layout: str = "HND",
                 workspace_bytes: int = DEFAULT_WORKSPACE) -> SliceMask:
    """Predict which slices to keep for ``q`` attending to ``k``; returns a SliceMask on q's device.

    q, k: [B, H, S, D] ("HND") or [B, S, H, D] ("NHD"), torch or cupy; CUDA tensors run the
    kernels (bf16/fp16), CPU tensors the torch reference. ``method``: "auto", the default
    (top-k: the "topk" mask with its default scores, checked per head on a few sampled query
    blocks against their exact column-max mask; heads where it misses more than
    fgcupy.auto_mask.MISS_RATIO times that mask's share of the attention (plus MISS_FLOOR), or
    its estimated output error exceeds fgcupy.auto_mask.ERROR_RATIO times that mask's (past
    ERROR_FLOOR), are predicted again by the estimated column max; takes only density or top_k,
    scale, layout and workspace_bytes; syncs the host), "topk", "tau" or "threshold" (mean-query
    scoring alone, selected by that rule: cheaper, and several times off the oracle on heads whose queries
    look apart) or "colmax" (exact column maxima from ``lse``, selected by ``rule``: the rule
    whose option is given, "threshold" when none is; ``lse="estimate"`` where no dense step ran:
    fgcupy.lse_estimate.estimate_lse, near the oracle on every head family for one column-max
    pass plus the estimate, notes/MEASURED.md "Mask quality").
    ``density`` is top-k as a fraction of kv_len (a positive density keeps at least one key; 0
    keeps only what ``local`` and ``min_keys`` add, so alone it gives empty rows), or ``top_k`` a
    count. ``tau`` defaults to 0.9; ``threshold`` to 0.5 / kv_len for colmax.
    ``min_keys`` / ``max_keys`` clamp each block's count (``min_keys`` None: 1 for the threshold
    rule, whose high thresholds could leave a block nothing to attend to, else 0; ``max_keys`` not with combine "union",
    whose union of sub-block selections it could not bound); ``threshold`` is a probability in
    (0, 1]; ``local`` keys either side of the
    block (and its own) are kept first; ``scale`` defaults to 1 / sqrt(D). ``combine``: how
    sub-blocks of ``pool`` queries join, "max" (one selection on the max of their scores) or
    "union" (one selection each). ``workspace_bytes`` bounds the GPU score buffers and selection
    bitmasks (heads in chunks; the CPU reference scores every head at once).
    ``logits_dtype``: how stored mean-query logits are kept (one mean query per block or combine
    "union" only), torch.float16 (default for top-k and threshold) or torch.float32 (default for
    tau); see the module docstring.
    ``pool``: queries per pooled sub-block (slice_m: one mean query per block).
    ``pooling``: how each sub-block is scored (combine "max"; see mask_reference): "mean" (its
    mean query), "sample" (its middle query, scores dilated along the keys by pool // 2 either
    side), "both" (the geometric mean of the two scores; twice the scoring work) or "adaptive"
    (per query block: "sample" where the block's queries point different ways, their mean
    resultant length |mean q| / mean |q| below mask_reference.COHERENCE_CUT, else "mean"; the cost of
    "mean" plus a sliding max over the sampled blocks' rows); or one of those per head (a list of H, e.g. from ``fgcupy.calibration.calibrate``): heads are
    predicted in groups of one pooling and joined in head order by one gather (one host sync).
    ``exact_band``: keys within this many of the block (either side) are raised to their exact
    column-max score where it is above the pooled one (slice_m 64 or 128, combine "max"; None: off; see
    mask_reference). Left as "auto", mean-query methods with combine "max" and slice_m 64 or
    128 use pool=DEFAULT_POOL, pooling=DEFAULT_POOLING and exact_band=DEFAULT_EXACT_BAND (an
    explicit pool keeps mean queries unless pooling is given); other calls use one mean query
    per block and no band.
    ``diagonals``: key offsets (key index - query index, e.g. plus or minus one frame) where the
    exact band is applied again, moved by that many keys (needs exact_band); heads that attend
    at fixed offsets, such as the same place in other frames, get those keys scored exactly.
    ``fgcupy.find_diagonals`` finds them from sampled queries. Each costs about one band.
    ``candidates`` (colmax only): a SliceMask, or a list of them, of this shape and slice_m: only
    the keys they keep are scored (exactly); other keys score 0, so a top-k keeps candidates
    first. With ``lse`` from a sparse step (its row LSE over the keys it kept), a refresh that
    needs no dense step: the cost is one pass of Q K^T over the candidates' slices.
    ``products`` (colmax): "input" multiplies q and k as given; "e4m3" rounds each head's q and k
    to float8 e4m3 under a power-of-two scale (fgcupy.e4m3; Hopper GPUs with head dim 128, whose
    tensor cores multiply it at twice the bfloat16 rate, or the CPU reference; not with
    candidates); "auto" takes "e4m3"
    with lse="estimate" where it runs (on the head families its masks stay within 0.02x of the
    inputs' oracle ratios, notes/PERF.md), else "input".
    NaN in q or k: a NaN key adds no mass to any row's normaliser and scores lowest (a sampled
    pooling's dilation may still keep it); a NaN query makes its pooled row's scores NaN, which
    add nothing (with one mean query per block, that block's keys come in index order; the
    query's own output is NaN through any mask).
    """
    qh, kh = query_key_views(q, k, layout)
    check_method(method)
    if method == "auto":
        given = options_auto_refuses(dict(
            tau=tau, threshold=threshold, rule=rule, pool=pool, combine=combine, min_keys=min_keys, max_keys=max_keys,
            local=local, lse=lse, logits_dtype=logits_dtype, exact_band=exact_band, pooling=pooling,
            diagonals=diagonals, candidates=candidates, products=products))
        if given:
            raise auto_refusal(given)
        return _predict_auto(qh, kh, slice_m, density, top_k, scale, workspace_bytes)
    poolings = None
    if isinstance(pooling, (list, tuple)):
        poolings = _checked_poolings(pooling, qh.shape[1], method)
        pooling = poolings[0] if poolings else AUTO
        poolings = poolings if len(set(poolings)) > 1 else None
    _check_kernel_slice(qh, slice_m)
    if hasattr(diagonals, "__next__"):  # an iterator: read once, for every pooling's request alike
        diagonals = tuple(diagonals)
    options = dict(density=density, top_k=top_k, tau=tau, threshold=threshold, rule=rule, pool=pool,
                   combine=combine, min_keys=min_keys, max_keys=max_keys, local=local, scale=scale,
                   logits_dtype=logits_dtype, exact_band=exact_band, diagonals=diagonals)
    options["products"] = resolved_products(products, method, lse)
    req = None
    for each in poolings or (pooling,):  # every pooling of a per-head list is checked
        req = make_request(qh.shape[3], kh.shape[2], slice_m, method, pooling=each, **options)
    if lse is not None and method != "colmax":
        raise ValueError(f"lse applies to method='colmax' (scores from a dense step), not {method!r}")
    candidates = checked_candidates(candidates, qh, kh, slice_m, method)
    check_products(req, qh, candidates)
    lse_t = None
    if method == "colmax":
        if lse is None:
            raise ValueError("method='colmax' needs lse: the float32 [B, H, q_len] row LSE of a dense step, "
                             "or \"estimate\" where none ran")
        if isinstance(lse, str):
            if lse != "estimate":
                raise ValueError(f"lse must be a float32 [B, H, q_len] tensor or \"estimate\", got {lse!r}")
        else:
            lse_t = checked_lse(lse, qh)
    if qh.device.type == "cuda":
        bridge.dtype_name(qh.dtype, "q")
    workspace_bytes = check_workspace_bytes(workspace_bytes)
    if isinstance(lse, str) and qh.shape[0] * qh.shape[1]:
        lse_t = estimate_lse(qh, kh, req.slice_m, scale=req.scale, workspace_bytes=workspace_bytes)
    if qh.shape[0] * qh.shape[1] == 0:  # no heads: nothing to score, on any device
        indptr = torch.zeros(qh.shape[0], qh.shape[1], num_blocks(qh.shape[2], req.slice_m) + 1, dtype=torch.int32,
                             device=qh.device)
        return SliceMask(indptr, torch.zeros(0, dtype=torch.int32, device=qh.device), req.slice_m, qh.shape[2],
                         kh.shape[2])
    return predict_op.predict(qh, kh, lse_t, candidates, req, workspace_bytes,
                              None if poolings is None else (poolings, logits_dtype))


#: predict_mask's keywords an object may hold for later calls (q, k and layout are each call's).
PREDICT_OPTIONS = frozenset(inspect.signature(predict_mask).parameters) - {"q", "k", "layout"}
#: The options make_request checks.
_REQUEST_OPTIONS = frozenset(inspect.signature(make_request).parameters) - {"head_dim", "kv_len", "slice_m", "method"}
_SELECTIONS = frozenset({"density", "top_k", "tau", "threshold"})
#: What a holder passes on to method "auto".
_AUTO_HELD = ("slice_m",) + tuple(name for name in AUTO_OPTIONS if name != "layout")


def check_predict_options(options: dict, caller: str) -> None:
    """Refuse now what predict_mask would refuse later, for ``caller``, which holds ``options``
    for its calls: names predict_mask does not take, a method it does not have and, where a
    selection (density, top_k, tau or threshold) is given (without one, a later call may add it),
    what it refuses at any sequence length."""
    unknown = sorted(set(options) - PREDICT_OPTIONS)
    if unknown:
        raise TypeError(f"{caller} got options predict_mask does not take: {unknown}; it takes "
                        f"{sorted(PREDICT_OPTIONS)}")
    method = options.get("method", DEFAULT_METHOD)
    check_method(method)
    if not _SELECTIONS & set(options):
        return
    if method == "auto":
        refused = options_auto_refuses({name: value for name, value in options.items()
                                        if name not in ("method", *_AUTO_HELD)})
        if refused:
            raise auto_refusal(refused, takes=_AUTO_HELD)
    request = {name: value for name, value in options.items() if name in _REQUEST_OPTIONS}
    check_options(options.get("slice_m", 128), method, request, ONE_KEY)


def _check_kernel_slice(qh, slice_m) -> None:
    """A CUDA prediction's slice size must have an attention kernel (the mask is for one)."""
    if qh.device.type == "cuda" and slice_m not in SLICE_SIZES:
        raise ValueError(f"slice_m={slice_m!r} has no attention kernel; available: {SLICE_SIZES} "
                         "(the CPU reference takes any size)")


def _predict_auto(qh, kh, slice_m, density, top_k, scale, workspace_bytes) -> SliceMask:
    """method="auto" (fgcupy.auto_mask), its options checked as top-k's."""
    req = make_request(qh.shape[3], kh.shape[2], slice_m, "topk", density=density, top_k=top_k, scale=scale)
    check_auto_column_max(qh.shape[3], kh.shape[2], slice_m, density, top_k, scale)
    check_scale(req.scale)  # the check runs attention, whose kernels take a narrower range
    _check_kernel_slice(qh, slice_m)
    workspace_bytes = check_workspace_bytes(workspace_bytes)
    if qh.shape[0] * qh.shape[1] == 0 or qh.device.type == "meta":  # no heads, or a shape alone: top-k's
        return predict_mask(qh, kh, slice_m, "topk", density=density, top_k=top_k, scale=scale)
    if not torch.compiler.is_compiling():
        return _auto_mask(qh, kh, req.slice_m, req.top_k, req.scale, workspace_bytes)
    batch, heads, q_len, _ = qh.shape
    packed = torch.ops.fgcupy.predict_auto(qh, kh, req.slice_m, req.top_k, req.scale, workspace_bytes)
    indptr, indices = unpack_csr(packed, (batch, heads, num_blocks(q_len, req.slice_m) + 1))
    return SliceMask(indptr, indices, req.slice_m, q_len, kh.shape[2])


def _auto_mask(qh, kh, slice_m: int, top_k: int, scale: float, workspace_bytes: int) -> SliceMask:
    return auto_mask.predict_auto(qh, kh, slice_m, predict_mask, density=None, top_k=top_k, scale=scale,
                                  workspace_bytes=workspace_bytes)


def _auto_packed(qh, kh, slice_m, top_k, scale, workspace_bytes) -> torch.Tensor:
    mask = _auto_mask(qh, kh, slice_m, top_k, scale, workspace_bytes)
    return pack_csr(mask.indptr, mask.indices)


def _auto_fake(qh, kh, slice_m, top_k, scale, workspace_bytes) -> torch.Tensor:
    """Every head of an "auto" mask is a top-k mask (cheap or column max): its size follows from the shapes."""
    batch, heads, q_len, _ = qh.shape
    q_blocks = num_blocks(q_len, slice_m)
    kept = batch * heads * kept_slices(q_blocks, kh.shape[2], slice_m, top_k, 0, None, None)
    return packed_csr_empty(qh, (batch, heads, q_blocks + 1), kept)


# method="auto" on [B, H, S, D] q and k (the checked top_k and scale): its mask's (indptr,
# indices) packed (op_library.pack_csr). An op, so torch.compile traces over its host syncs
# (and CUDA graphs leave it out).
define("predict_auto(Tensor q, Tensor k, int slice_m, SymInt top_k, float scale, int workspace_bytes) -> Tensor",
       cpu=_auto_packed, cuda=_auto_packed, fake=_auto_fake, syncs_host=True)


def _checked_poolings(poolings, heads: int, method: str) -> tuple:
    """A per-head pooling list, checked, as a tuple."""
    if len(poolings) != heads or any(not isinstance(p, str) or p not in POOLINGS for p in poolings):
        raise ValueError(f"pooling per head must list one of {POOLINGS} for each of the {heads} heads, "
                         f"got {poolings!r}")
    if method == "colmax":
        raise ValueError("pooling per head applies to the mean-query methods, not colmax")
    return tuple(poolings)
