"""Our attention in diffusers: an attention backend named "dmf_kernels" in diffusers' own
registry, and a fallback for the processors that call F.scaled_dot_product_attention directly.

How diffusers routes attention (diffusers/models/attention_dispatch.py): the processors of most
transformers (Flux, Wan, Qwen-Image, ...) call `dispatch_attention_fn(query, key, value,
attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=processor._attention_backend)` with
(B, N, H, D) tensors; it looks the backend up in `_AttentionBackendRegistry` (the processor's
`_attention_backend`, else the active one that `attention_backend(...)` sets). Backend names are
the members of the enum `AttentionBackendName`, which diffusers offers no call to extend: we add
one member, "dmf_kernels", the way Enum builds its own members, then register our function with
the registry's own `register` decorator. After that diffusers' own `model.set_attention_backend
("dmf_kernels")` and `with attention_backend("dmf_kernels"):` work, and `patch` sets it on the
processors of one model only (set_attention_backend also changes the process-wide default).

Older processors (DiT's and PixArt's AttnProcessor2_0, SD3's JointAttnProcessor2_0) call
F.scaled_dot_product_attention themselves: `patch` gives such a processor a subclass whose
__call__ runs the processor's own code under a TorchFunctionMode that sends that one function to
our op (same layout (B, H, N, D), no transpose). Everything else the processor does (projections,
qk-norms, RoPE applied to q and k in torch code, masks prepared by `attn.prepare_attention_mask`)
is unchanged, and is correct under forward-mode AD as it is.

The attention itself: dmf_kernels.attention on transposed views (no copy), with its one-pass jvp
kernel under torch.func.jvp / forward_ad / model_jvp. Refused with a clear error: dropout_p > 0,
is_causal, a mask our op cannot take (see _mask), context parallelism.
"""
import enum
import inspect

import torch
from torch.overrides import TorchFunctionMode

from .attention import attention as _attention

NAME = "dmf_kernels"


def available():
    """Whether diffusers imports (it is an optional dependency)."""
    try:
        import diffusers  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def _op_takes(keyword):
    """Whether our attention op takes `keyword` (attn_mask, enable_gqa arrive with issue 22 item 1)."""
    try:
        return keyword in inspect.signature(_attention).parameters
    except (TypeError, ValueError):
        return False


def _mask(attn_mask, q, k):
    """The mask as our op takes it, or None for no mask. A boolean mask that is all True or an
    additive mask that is all zero changes nothing and is dropped (on the CPU the check is free;
    on a GPU it is a host sync, paid only when a mask is given). Any other mask goes to the op
    when it takes one, else is refused: dropping it would silently change the result."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"dmf_kernels attention backend: attn_mask must be a Tensor or None, got "
                        f"{type(attn_mask).__name__}")
    if _op_takes("attn_mask"):
        return attn_mask
    if not torch.compiler.is_compiling():
        trivial = bool(attn_mask.all()) if attn_mask.dtype == torch.bool else not bool(attn_mask.any())
        if trivial:
            return None
    raise NotImplementedError(
        f"dmf_kernels attention backend: this build's dmf_kernels.attention takes no attn_mask, and the mask "
        f"given (shape {tuple(attn_mask.shape)}, {attn_mask.dtype}) masks some keys; refusing rather than "
        "dropping it. Use a batch without padding, or diffusers' 'native' backend for this call.")


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention's contract on (B, H, N, D) tensors, through our op."""
    if dropout_p:
        raise ValueError(f"dmf_kernels attention backend: dropout_p must be 0, got {dropout_p} (the kernels have "
                         "no dropout; a DiT is trained without attention dropout)")
    if is_causal:
        raise ValueError("dmf_kernels attention backend: is_causal=True is not supported (non-causal kernels only)")
    kwargs = {}
    mask = _mask(attn_mask, query, key)
    if mask is not None:
        kwargs["attn_mask"] = mask
    hq, hk = query.shape[1], key.shape[1]
    if hq != hk:
        if not enable_gqa:
            raise ValueError(f"dmf_kernels attention backend: query has {hq} heads and key {hk}; pass "
                             "enable_gqa=True for grouped-query attention")
        if hq % hk:
            raise ValueError(f"dmf_kernels attention backend: grouped-query attention needs the query heads ({hq}) "
                             f"to be a multiple of the key heads ({hk})")
        if _op_takes("enable_gqa"):
            kwargs["enable_gqa"] = True
        else:  # correct, at (hq / hk) times the k / v memory
            key = key.repeat_interleave(hq // hk, dim=1)
            value = value.repeat_interleave(hq // hk, dim=1)
    return _attention(query, key, value, scale=scale, **kwargs)


def backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
            _parallel_config=None):
    """The registered backend: diffusers' layout (B, N, H, D) in and out, our op on transposed views."""
    if _parallel_config is not None:
        raise NotImplementedError("dmf_kernels attention backend: context parallelism is not supported")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]  # a (B, NK) key-padding mask, as diffusers' native backend reads it
    out = sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, dropout_p, is_causal,
               scale, enable_gqa)
    return out.transpose(1, 2)


def register():
    """Adds "dmf_kernels" to diffusers' AttentionBackendName and registers `backend` (idempotent).
    Returns the enum member."""
    from diffusers.models import attention_dispatch as ad

    names = ad.AttentionBackendName
    member = names._value2member_map_.get(NAME)
    if member is None:
        # What EnumType does for each member it builds (Python 3.11-3.13): the str value, its
        # name, and the three lookup tables; type.__setattr__ because EnumType's refuses members.
        member = str.__new__(names, NAME)
        member._name_, member._value_ = "DMF_KERNELS", NAME
        member.__objclass__ = names
        if hasattr(enum.Enum, "_sort_order_"):
            member._sort_order_ = len(names._member_names_)
        names._member_map_["DMF_KERNELS"] = member
        names._value2member_map_[NAME] = member
        names._member_names_.append("DMF_KERNELS")
        type.__setattr__(names, "DMF_KERNELS", member)
    if member not in ad._AttentionBackendRegistry._backends:
        ad._AttentionBackendRegistry.register(member, constraints=[ad._check_device, ad._check_shape])(backend)
    return member


class _SdpaToOurs(TorchFunctionMode):
    """Sends F.scaled_dot_product_attention to our op; every other function runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def _call_with_our_sdpa(self, *args, **kwargs):
    with _SdpaToOurs():
        return type(self).__mro__[1].__call__(self, *args, **kwargs)


_PROCESSOR_CLASSES = {}


def _reduce_processor(self, protocol):
    return _rebuild_processor, (type(self).__mro__[1], self.__dict__)


def _rebuild_processor(base, state):
    obj = base.__new__(base)
    obj.__dict__.update(state)
    obj.__class__ = processor_class(base)
    return obj


def processor_class(base):
    """A subclass of a processor class whose __call__ runs the processor under _SdpaToOurs."""
    if base not in _PROCESSOR_CLASSES:
        _PROCESSOR_CLASSES[base] = type(base.__name__, (base,), dict(
            __call__=_call_with_our_sdpa, _dmf_kernels_patched="sdpa_processor", __reduce_ex__=_reduce_processor,
            __module__=base.__module__, __qualname__=base.__qualname__))
    return _PROCESSOR_CLASSES[base]


def uses_sdpa_directly(processor):
    """Whether a processor (one without `_attention_backend`) calls F.scaled_dot_product_attention
    in its __call__ (read from its source): only those get the fallback."""
    try:
        src = inspect.getsource(type(processor).__call__)
    except (OSError, TypeError):
        return False
    return "scaled_dot_product_attention" in src
