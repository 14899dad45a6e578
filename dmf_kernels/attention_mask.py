"""The attention's mask and grouped-query heads, checked and brought to the one form every
path takes.

attn_mask (as F.scaled_dot_product_attention): broadcastable to (B, H, NQ, NK); boolean
(True = attend) or an additive float (q's dtype or float32; float64 for float64 q). The
kernels take one form, an additive bias in the compute dtype (float32, float64 for float64
inputs) with the mask's own (unexpanded) shape: a boolean mask becomes 0 / -inf, so a
key-padding mask (B, 1, 1, NK) stays B * NK numbers. A row whose bias is -inf for every key
(fully masked) gives zeros, not NaN, in the output, tangent and gradients; a NaN in the
mask is a NaN score (NaN out). The mask is a constant of the op like the rotary tables:
no tangent, no gradient.

Grouped-query attention (enable_gqa=True, as SDPA): k and v have Hkv heads, q has
H = g * Hkv, and query head h reads kv head h // g. The Triton kernels index the kv head
(no copy of k and v); the PyTorch path folds the g query heads of a group into its query
axis (fold), which is the same attention with g * NQ queries.
"""
import torch
from torch import Tensor


def check_heads(q, k, v, enable_gqa, op):
    """Raises unless k and v share their heads and q's heads are theirs, or a multiple of
    them with enable_gqa."""
    B, H = q.shape[:2]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{op}: q, k, v must share the batch B = {B}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{op}: k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    hkv = k.shape[1]
    if hkv == H:
        return
    if not enable_gqa:
        raise ValueError(f"{op}: q has {H} heads but k and v have {hkv}; q, k, v must share batch and heads "
                         f"(B, H) = {(B, H)} unless enable_gqa=True (grouped-query attention)")
    if hkv == 0 or H % hkv:
        raise ValueError(f"{op}: with enable_gqa, q's heads ({H}) must be a multiple of k's and v's ({hkv})")


def check_mask(mask, q, k, op):
    """Raises on a mask that is not a tensor, has another dtype, device or shape than the
    attention allows (module docstring)."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: attn_mask must be a Tensor or None, got {type(mask).__name__}")
    ok = (torch.bool, q.dtype, torch.float32)
    if mask.dtype not in ok:
        raise TypeError(f"{op}: attn_mask must be boolean (True = attend) or an additive float mask of q's dtype "
                        f"{q.dtype} or float32, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{op}: attn_mask is on {mask.device}, expected q's device {q.device}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dim() > 4 or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
        raise ValueError(f"{op}: attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, H, NQ, NK) = {full}")


def drop_all_true(mask):
    """None for a boolean mask that masks nothing (the unmasked kernels then run, at no cost),
    else the mask. The check reads the mask (a device sync on CUDA), so it is skipped while
    compiling or capturing a CUDA graph, where the mask is simply applied."""
    if mask is None or mask.dtype != torch.bool or mask.is_meta or torch.compiler.is_compiling():
        return mask
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return mask
    return None if bool(mask.all()) else mask


def bias(mask, dtype):
    """The additive form (module docstring): 4-D, the mask's own broadcast shape, in `dtype`."""
    while mask.dim() < 4:
        mask = mask[None]
    # A mask passed already expanded (m[:, None, None, :].expand(B, H, N, N), a common idiom) has
    # stride 0 along its broadcast dims: take one slice of each, so that it stays the key-padding
    # form (B, 1, 1, NK) and is not converted at full size (B * H * N^2 floats: 8.6 GB at B 8,
    # H 16, N 4096).
    mask = mask[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for n, st in zip(mask.shape, mask.stride()))]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def keys_only(mask):
    """Whether a 4-D bias varies only with the batch and the key (a key-padding mask
    (B, 1, 1, NK)): the kernels' fast path reads one vector per key block."""
    return mask.shape[1] == 1 and mask.shape[2] == 1


def fold(t, hkv):
    """(B, H, N, ...) -> (B, Hkv, g * N, ...): the g query heads of each kv head as one longer
    query axis (a view when the strides allow it)."""
    B, H = t.shape[:2]
    return t if H == hkv else t.reshape(B, hkv, (H // hkv) * t.shape[2], *t.shape[3:])


def unfold(t, H):
    """fold's inverse."""
    B, hkv = t.shape[:2]
    return t if H == hkv else t.reshape(B, H, t.shape[2] // (H // hkv), *t.shape[3:])


def fold_bias(b, B, H, hkv, NQ):
    """The 4-D bias for the folded queries (fold): a key-padding bias needs nothing; else it is
    expanded to (B, H, NQ, NK) and folded (a copy)."""
    if H == hkv or keys_only(b):
        return b
    return fold(b.expand(B, H, NQ, b.shape[-1]), hkv)
