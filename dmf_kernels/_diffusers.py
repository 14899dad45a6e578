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
kernel under torch.func.jvp / forward_ad / model_jvp; masks (boolean or additive, e.g. PixArt's
caption padding) and grouped-query heads (enable_gqa) go to the op as they are. Refused with a
clear error: dropout_p > 0, is_causal, context parallelism.
"""
import enum
import inspect

import torch
from torch.overrides import TorchFunctionMode

from .attention import attention as _attention

NAME = "dmf_kernels"


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention's contract on (B, H, N, D) tensors, through our op (which
    checks heads, masks and shapes itself, naming the argument)."""
    if dropout_p:
        raise ValueError(f"dmf_kernels attention backend: dropout_p must be 0, got {dropout_p} (the kernels have "
                         "no dropout; a DiT is trained without attention dropout)")
    if is_causal:
        raise ValueError("dmf_kernels attention backend: is_causal=True is not supported (non-causal kernels only)")
    return _attention(query, key, value, scale=scale, attn_mask=attn_mask, enable_gqa=enable_gqa)


def backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
            _parallel_config=None):
    """The registered backend: diffusers' layout (B, N, H, D) in and out, our op on transposed views."""
    if _parallel_config is not None:
        raise NotImplementedError("dmf_kernels attention backend: context parallelism is not supported")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.shape == (query.shape[0], key.shape[1]):
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
