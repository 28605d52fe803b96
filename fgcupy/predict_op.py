"""Mask prediction as a torch.library op (``torch.ops.fgcupy.predict_mask``).

The op takes a checked request (``fgcupy.predict_mask`` builds it) as a token plus the values that
may be symbolic while torch.compile traces (top_k, threshold and scale follow from the shapes).
Its fake implementation sizes a top-k mask from the shapes, so CUDA graphs take it; every other
selection (and a pooling per head, joined with a host sync) gets a data-dependent length (an
unbacked size), which torch.compile(fullgraph=True) traces and CUDA graphs leave out. The CUDA implementation runs the kernels, the CPU one the
torch reference. :func:`predict` uses the op only while torch.compile traces (see fgcupy.ops).
"""

from __future__ import annotations

import torch

from .mask import SliceMask, num_blocks
from .layout import query_key_views
from .mask_request import MaskRequest, check_products, checked_candidates, checked_lse, make_request
from .op_library import define, pack_csr, packed_csr_empty, unpack_csr

#: The request's fields a token carries (top_k, threshold and scale travel as op arguments).
_TOKEN_FIELDS = ("method", "rule", "slice_m", "pool", "combine", "tau", "min_keys", "max_keys", "local",
                 "logits_dtype", "exact_band", "pooling", "diagonals", "products")
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def request_token(req: MaskRequest, per_head: tuple | None = None) -> str:
    """``req`` as the op's string. ``per_head``: (a pooling per head, the caller's logits_dtype or
    None), which replace the request's own (each pooling may store its scores in its own dtype)."""
    fields = {name: getattr(req, name) for name in _TOKEN_FIELDS}
    if per_head is not None:
        fields["pooling"], fields["logits_dtype"] = ",".join(per_head[0]), per_head[1]
    fields["logits_dtype"] = str(fields["logits_dtype"]).removeprefix("torch.")
    fields["diagonals"] = ",".join(str(d) for d in fields["diagonals"])
    return ";".join(f"{name}={value}" for name, value in fields.items())


def _fields(token: str) -> dict:
    """The token's fields as Python values (unchecked); ValueError if it is not a token."""
    try:
        fields = dict(item.split("=", 1) for item in token.split(";"))
    except ValueError:
        fields = {}
    if sorted(fields) != sorted(_TOKEN_FIELDS):
        raise ValueError(f"not a prediction request token: {token!r}")

    def number(text, kind):
        return None if text == "None" else kind(text)

    return dict(
        method=fields["method"], rule=fields["rule"], slice_m=int(fields["slice_m"]), pool=int(fields["pool"]),
        combine=fields["combine"], tau=number(fields["tau"], float), min_keys=int(fields["min_keys"]),
        max_keys=number(fields["max_keys"], int), local=number(fields["local"], int),
        logits_dtype=number(fields["logits_dtype"], lambda name: _DTYPES.get(name, name)),
        exact_band=number(fields["exact_band"], int), pooling=tuple(fields["pooling"].split(",")),
        diagonals=tuple(int(d) for d in fields["diagonals"].split(",") if d), products=fields["products"])


def _requests(q, k, token: str, top_k: int, threshold: float, scale: float) -> tuple:
    """(MaskRequest per head, its pooling) from an op call, every option checked again: the op
    may be called directly."""
    fields = _fields(token)
    poolings = fields.pop("pooling")
    if len(poolings) not in (1, q.shape[1]):
        raise ValueError(f"a pooling per head needs {q.shape[1]} entries, got {len(poolings)}")
    method, rule, slice_m = fields.pop("method"), fields.pop("rule"), fields.pop("slice_m")
    requests = {}
    for pooling in dict.fromkeys(poolings):
        requests[pooling] = make_request(
            q.shape[3], k.shape[2], slice_m, method, rule=rule if method == "colmax" else None,
            top_k=top_k if rule == "topk" else None, threshold=threshold if rule == "threshold" else None,
            pooling=pooling, scale=scale, **fields)
    return requests, poolings


def _is_static(fields: dict) -> bool:
    """Whether the mask's sizes follow from the shapes and the op needs no host sync (so CUDA
    graphs may take it): top-k with one selection per block and one pooling for every head (a
    pooling per head joins its groups' masks with a sync). ``fields``: a token's (``_fields``)."""
    if len(fields["pooling"]) > 1:
        return False
    req = MaskRequest(**{**fields, "pooling": fields["pooling"][0]}, top_k=0, threshold=None, scale=1.0)
    return req.rule == "topk" and req.kind != "union"


def _predict_fake(q, k, lse, candidate_indptrs, candidate_indices, token, top_k, threshold, scale, workspace_bytes):
    fields = _fields(token)
    batch, heads, q_len, _ = q.shape
    q_blocks = num_blocks(q_len, fields["slice_m"])
    if _is_static(fields):
        from .gpu_prediction import kept_slices

        kept = batch * heads * kept_slices(q_blocks, k.shape[2], fields["slice_m"], top_k, fields["min_keys"],
                                           fields["max_keys"], fields["local"])
    else:
        kept = None
    return packed_csr_empty(q, (batch, heads, q_blocks + 1), kept)


def _predict(*args) -> torch.Tensor:
    mask = _predict_mask(*args)
    return pack_csr(mask.indptr, mask.indices)


@torch.no_grad()  # integer indices out: nothing to differentiate (and reductions into out= refuse grad)
def _predict_mask(q, k, lse, candidate_indptrs, candidate_indices, token, top_k, threshold, scale,
                  workspace_bytes) -> SliceMask:
    requests, poolings = _requests(q, k, token, top_k, threshold, scale)
    slice_m = next(iter(requests.values())).slice_m
    # The op may be called directly: its tensors are checked as predict_mask checks them.
    query_key_views(q, k)
    method = _fields(token)["method"]
    if method == "colmax":
        if lse is None:
            raise ValueError("method='colmax' needs lse: the float32 [B, H, q_len] row LSE")
        checked_lse(lse, q)
    elif lse is not None:
        raise ValueError(f"lse applies to method='colmax', not {method!r}")
    candidates = tuple(SliceMask(indptr, indices, slice_m, q.shape[2], k.shape[2])
                       for indptr, indices in zip(candidate_indptrs, candidate_indices, strict=True))
    candidates = checked_candidates(candidates, q, k, slice_m, method) if candidates else ()
    for req in requests.values():
        check_products(req, q, candidates)
    if len(requests) == 1:
        return _predict_one(q, k, next(iter(requests.values())), lse, candidates, workspace_bytes)
    return _predict_per_head(q, k, requests, poolings, workspace_bytes)


def _predict_one(qh, kh, req: MaskRequest, lse, candidates: tuple, workspace_bytes: int) -> SliceMask:
    # The prediction's modules load with its first call: a process that only attends skips them.
    from .gpu_prediction import GpuPrediction, predict_reference

    if qh.device.type == "cuda":
        return GpuPrediction(qh, kh, req, lse, workspace_bytes, candidates).run()
    return predict_reference(qh, kh, req, lse, candidates)


def _predict_per_head(qh, kh, requests: dict, poolings: tuple, workspace_bytes: int) -> SliceMask:
    """Head h predicted with ``poolings[h]``: one prediction per pooling over its heads, joined
    in head order (one gather, one host sync)."""
    masks, placed = [], []
    for pooling, req in requests.items():
        group = [h for h, p in enumerate(poolings) if p == pooling]
        index = torch.tensor(group, device=qh.device)
        masks.append(_predict_one(qh.index_select(1, index), kh.index_select(1, index), req, None, (),
                                  workspace_bytes))
        placed += group
    position = {h: i for i, h in enumerate(placed)}
    from .mask_algebra import concat_heads

    return concat_heads(masks, order=[position[h] for h in range(qh.shape[1])])


# The mask that ``token`` (a checked request, see request_token) selects for
# [B, H, S, D] q and k; lse: a dense step's row LSE (colmax); candidates: masks' CSR (colmax);
# top_k -1 and threshold -1 where the rule takes none. Out: its (indptr, indices) packed
# (op_library.pack_csr).
define("predict_mask(Tensor q, Tensor k, Tensor? lse, Tensor[] candidate_indptrs, Tensor[] candidate_indices, "
       "str token, SymInt top_k, float threshold, float scale, int workspace_bytes) -> Tensor",
       cpu=_predict, cuda=_predict, fake=_predict_fake)


def predict(q, k, lse, candidates: tuple, req: MaskRequest, workspace_bytes: int,
            per_head: tuple | None = None) -> SliceMask:
    """The mask ``req`` selects (``per_head``: see request_token): through the op under
    torch.compile, else its implementation."""
    token = request_token(req, per_head)
    args = (q, k, lse, [m.indptr for m in candidates], [m.indices for m in candidates],
            token, -1 if req.top_k is None else req.top_k,
            -1.0 if req.threshold is None else req.threshold, req.scale, workspace_bytes)
    meta = q.device.type == "meta"
    if meta and not _is_static(_fields(token)):
        raise ValueError("predict_mask on meta tensors: only a top-k mask's size follows from the shapes "
                         f"(method {req.method!r}, rule {req.rule!r} needs the values)")
    if torch.compiler.is_compiling() or meta:  # the op's fake implementation gives a meta mask its shape
        batch, heads, q_len, _ = q.shape
        indptr, indices = unpack_csr(torch.ops.fgcupy.predict_mask(*args),
                                     (batch, heads, num_blocks(q_len, req.slice_m) + 1))
    elif per_head is None:  # eager: the request is checked already
        return _predict_one(q, k, req, lse, candidates, workspace_bytes)
    else:
        return _predict_mask(*args)
    return SliceMask(indptr, indices, req.slice_m, q.shape[2], k.shape[2])
