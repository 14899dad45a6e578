"""Attention masks and grouped-query attention (issues 22 and 24): forward, backward and the
tangent (torch.func.jvp, forward_ad, the explicit jvp form, compiled) against the float64
eager reference (attention_triton_helpers.ref_attention), with padded and fully masked
rows, boolean and additive masks of every broadcast shape, GQA ratios 2 and 4, a custom
scale, NQ != NK, and the rotary tables.

float64 runs the PyTorch path; float32 / float16 the aten flash path on the CPU (the
three-way bound), the Triton kernels on CUDA and, with TRITON_INTERPRET=1 (make test runs
this file a second time with it), on the CPU."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from attention_triton_helpers import INTERPRET, assert_nan_close, ref_attention
from conftest import assert_f64, assert_three_way, rand


def inputs(B, H, HKV, NQ, NK, D, device, dtype=torch.float64, seed=0):
    return [rand(B, h, n, D, device=device, dtype=dtype, seed=seed + i)
            for i, (h, n) in enumerate(((H, NQ), (HKV, NK), (HKV, NK)))]


def padding_mask(B, NQ, NK, device, kind):
    """Masks with padded keys (a different count per batch) and, for the (B, 1, NQ, NK) kinds,
    fully masked query rows; the first key block (16 keys in the interpreter) is masked for
    some rows, so the online softmax starts from a row with no key."""
    keep = torch.arange(NK, device=device)[None, :] < torch.tensor([NK, NK - 9][:B], device=device)[:, None]
    if kind == "keys":  # key padding (B, 1, 1, NK), PixArt's encoder mask
        return keep[:, None, None, :]
    rows = keep[:, None, None, :] & (torch.arange(NQ, device=device)[:, None] % 5 != 3)[None, None]
    rows[:, :, 1, :17] = False
    if kind == "rows":  # (B, 1, NQ, NK): query rows 3, 8, ... fully masked
        return rows
    if kind == "heads":  # (1, H, NQ, NK) boolean per head, head 1 with no fully masked row
        return torch.stack([rows[0, 0], keep[0].expand(NQ, NK)])[None]
    if kind == "2d":  # (NQ, NK)
        return rows[0, 0]
    raise ValueError(kind)


def additive(mask, dtype, fill=float("-inf")):
    # an additive mask of the boolean one, with a random finite bias where it attends
    bias = rand(*mask.shape, device=mask.device, seed=77).to(dtype)
    return bias.masked_fill(~mask, fill)


def check(device, dtype, shape, mask=None, enable_gqa=False, scale=None, rope=None, seed=0, skip=()):
    """Every entry point of dk.attention against ref_attention in float64 (dtype float64), or
    the three-way bound against eager ref_attention in dtype (low precision); skip: results
    not compared."""
    B, H, HKV, NQ, NK, D = shape
    args = inputs(*shape, device, dtype, seed)
    tangents = inputs(*shape, device, dtype, seed + 10)
    kw = dict(scale=scale, attn_mask=mask, enable_gqa=enable_gqa)
    rkw = dict(kw)
    if rope is not None:
        kw["rope_cos"], kw["rope_sin"] = rope
        rkw["rope_cos"], rkw["rope_sin"] = rope
    f64 = dtype == torch.float64

    def run(fn, cast, kwargs):
        kwargs = {n: (cast(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                  for n, t in kwargs.items()}
        xs = [cast(t).clone().requires_grad_() for t in args]
        out = fn(*xs, **kwargs)
        g = rand(*out.shape, device=device, seed=30).to(out.dtype)
        r = dict(o=out.detach(), **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, xs, g))))
        r["tangent"] = torch.func.jvp(lambda *a: fn(*a, **kwargs), tuple(cast(t) for t in args),
                                      tuple(cast(t) for t in tangents))[1]
        return r, kwargs

    ours, kwargs = run(dk.attention, lambda t: t, kw)
    ref, _ = run(ref_attention, lambda t: t.double(), rkw)
    for n in skip:
        del ref[n]
    if f64:
        for n, r in ref.items():
            assert_f64(ours[n], r, n)
        with fwAD.dual_level():
            t = fwAD.unpack_dual(dk.attention(*[fwAD.make_dual(p, tt) for p, tt in zip(args, tangents)], **kw))
        assert_f64(t.tangent, ref["tangent"], "forward_ad tangent")
        o, t = dk.jvp.attention(*args, *tangents, **kw)
        assert_f64(o, ref["o"], "jvp form o")
        assert_f64(t, ref["tangent"], "jvp form tangent")
    else:
        eager, _ = run(ref_attention, lambda t: t, rkw)
        for n, r in ref.items():
            assert_three_way(ours[n], eager[n], r, dtype, n)
    return ours, ref


MASKS = ["keys", "rows", "heads", "2d"]


def low_dtypes(device):
    # bf16: the CPU path and CUDA; the interpreter's tl.dot on bf16 is garbage
    return [torch.float32, torch.float16] + ([] if INTERPRET and device == "cpu" else [torch.bfloat16])


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("form", ["bool", "float32", "q_dtype"])
def test_attention_mask(device, kind, form):
    B, H, NQ, NK, D = 2, 2, 13, 40, 16
    mask = padding_mask(B, NQ, NK, device, kind)
    dtypes = [torch.float64] + (low_dtypes(device) if form != "float32" else [torch.float32])
    for dtype in dtypes:
        m = mask if form == "bool" else additive(mask, torch.float32 if form == "float32" else dtype)
        ours, ref = check(device, dtype, (B, H, H, NQ, NK, D), m, scale=0.3)
        if kind in ("rows", "2d"):  # the fully masked rows: exactly zero, everywhere
            assert (ours["o"][:, :, 3] == 0).all() and (ours["tangent"][:, :, 3] == 0).all()
            assert (ours["dq"][:, :, 3] == 0).all()


@pytest.mark.parametrize("ratio", [2, 4])
def test_attention_gqa(device, ratio):
    B, HKV, NQ, NK, D = 2, 2, 17, 23, 16
    for dtype in [torch.float64] + low_dtypes(device):
        check(device, dtype, (B, HKV * ratio, HKV, NQ, NK, D), enable_gqa=True)


def test_attention_gqa_mask_rope(device):
    # everything at once: GQA 3, a per-row mask with fully masked rows, rope (NQ = NK), scale
    B, HKV, N, D = 1, 2, 20, 32
    cos, sin = rand(N, D, device=device, seed=90), rand(N, D, device=device, seed=91)
    mask = padding_mask(B, N, N, device, "rows")
    for dtype in [torch.float64] + low_dtypes(device):
        check(device, dtype, (B, 3 * HKV, HKV, N, N, D), mask, True, 0.2, (cos.to(dtype), sin.to(dtype)))
        check(device, dtype, (B, 3 * HKV, HKV, N, N, D), additive(padding_mask(B, N, N, device, "keys"), dtype),
              True, None, (cos.float(), sin.float()))


def test_attention_mask_finfo_min(device):
    # HF-style additive masks with finfo.min: a row masked that way everywhere is uniform in
    # the reference (not a fully masked row); the kernels must not overflow it to -inf. Its
    # gradients are not compared: the scores are lost in rounding next to -3.4e38, so the
    # backward's exp(s + bias - lse) is 1 for every key instead of 1 / NK (SDPA's fused
    # backends share this; a boolean mask or -inf has no such row). Known, documented.
    B, H, NQ, NK, D = 1, 2, 9, 33, 16
    for dtype in (torch.float64, torch.float32, torch.float16):
        m = additive(padding_mask(B, NQ, NK, device, "rows"), torch.float32, torch.finfo(torch.float32).min)
        ours, ref = check(device, dtype, (B, H, H, NQ, NK, D), m if dtype != torch.float64 else m.double(),
                          skip=("dq", "dk", "dv"))
        assert ours["o"][:, :, 3].abs().max() > 0


def test_attention_mask_nan(device):
    # a NaN in the mask is a NaN score; NaN in q still NaN under a mask; a fully masked row
    # stays zero next to a NaN elsewhere (a NaN is not a -inf)
    B, H, NQ, NK, D = 1, 2, 9, 20, 16
    for dtype in (torch.float64, torch.float32, torch.float16):
        q, k, v = inputs(B, H, H, NQ, NK, D, device, dtype)
        m = additive(padding_mask(B, NQ, NK, device, "rows"), torch.float32)
        m[0, 0, 5, 2] = float("nan")
        r = ref_attention(q.double(), k.double(), v.double(), attn_mask=m)
        assert_nan_close(dk.attention(q, k, v, attn_mask=m), r, f"{dtype} NaN in the mask")
        q[0, 1, 6, 0] = float("nan")
        mb = padding_mask(B, NQ, NK, device, "rows")
        r = ref_attention(q.double(), k.double(), v.double(), attn_mask=mb)
        o, t = dk.jvp.attention(q, k, v, q, k, v, attn_mask=mb)
        rt = torch.func.jvp(lambda *a: ref_attention(*a, attn_mask=mb), (q.double(), k.double(), v.double()),
                            (q.double(), k.double(), v.double()))[1]
        assert_nan_close(o, r, f"{dtype} NaN in q, masked")
        assert_nan_close(t, rt, f"{dtype} NaN in q, masked: tangent")
        assert (o[0, :, 3] == 0).all() and o[0, 1, 6].isnan().all()


def test_attention_mask_gqa_compiled(device):
    torch._dynamo.reset()
    B, HKV, NQ, NK, D = 2, 1, 12, 19, 16
    q, k, v = inputs(B, 2, HKV, NQ, NK, D, device, torch.float32)
    tangents = inputs(B, 2, HKV, NQ, NK, D, device, torch.float32, seed=10)
    mask = padding_mask(B, NQ, NK, device, "rows")

    def step(q, k, v, qd, kd, vd, mask):
        o, t = torch.func.jvp(lambda *a: dk.attention(*a, attn_mask=mask, enable_gqa=True), (q, k, v), (qd, kd, vd))
        return o, t

    o, t = torch.compile(step, fullgraph=True)(q, k, v, *tangents, mask)
    eo, et = step(q, k, v, *tangents, mask)
    torch.testing.assert_close(o, eo)
    torch.testing.assert_close(t, et)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    xe = [x.clone().requires_grad_() for x in (q, k, v)]
    f = torch.compile(lambda a, b, c, m: dk.attention(a, b, c, attn_mask=m, enable_gqa=True), fullgraph=True)
    out, eout = f(*xs, mask), dk.attention(*xe, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, eout)
    for a, b in zip(torch.autograd.grad(out.sum(), xs), torch.autograd.grad(eout.sum(), xe)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["attention_fwd", "attention_jvp", "attention_bwd"])
def test_attention_mask_gqa_opcheck(device, name):
    q, k, v = inputs(1, 4, 2, 9, 13, 16, device, torch.float32)
    qd, kd, vd = inputs(1, 4, 2, 9, 13, 16, device, torch.float32, seed=3)
    m = padding_mask(1, 9, 13, device, "rows")
    o, lse = torch.ops.dmf_kernels.attention_fwd(q, k, v, 0.25, None, None, m, True)
    args = {"attention_fwd": (q, k, v, 0.25, None, None, m, True),
            "attention_jvp": (q, k, v, qd, None, vd, 0.25, None, None, m, True),
            "attention_bwd": (torch.randn_like(o), q, k, v, o, lse, 0.25, None, None, m, True)}[name]
    torch.library.opcheck(getattr(torch.ops.dmf_kernels, name).default, args)


def test_attention_mask_gqa_bad_input(device):
    q, k, v = inputs(2, 4, 2, 9, 13, 16, device, torch.float32)
    with pytest.raises(ValueError, match=r"q has 4 heads but k and v have 2; .* unless enable_gqa=True"):
        dk.attention(q, k, v)
    with pytest.raises(ValueError, match=r"with enable_gqa, q's heads \(4\) must be a multiple of k's and v's \(3\)"):
        dk.attention(q, *inputs(2, 3, 3, 9, 13, 16, device, torch.float32)[1:], enable_gqa=True)
    with pytest.raises(ValueError, match=r"k and v must have the same number of heads, got 2 and 1"):
        dk.attention(q, k, v[:, :1], enable_gqa=True)
    m = padding_mask(2, 9, 13, device, "rows")
    with pytest.raises(TypeError, match=r"attn_mask must be boolean \(True = attend\) or an additive float mask of "
                                        r"q's dtype torch.float32 or float32, got torch.int64"):
        dk.attention(q, k, v, attn_mask=m.long(), enable_gqa=True)
    with pytest.raises(TypeError, match=r"attn_mask must be boolean .* got torch.float16"):
        dk.attention(q, k, v, attn_mask=m.half(), enable_gqa=True)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 1, 9, 12\) does not broadcast to "
                                         r"\(B, H, NQ, NK\) = \(2, 4, 9, 13\)"):
        dk.attention(q, k, v, attn_mask=m[..., :12], enable_gqa=True)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(1, 2, 1, 9, 13\) does not broadcast"):
        dk.attention(q, k, v, attn_mask=m[None], enable_gqa=True)
    with pytest.raises(ValueError, match=r"attn_mask is on meta, expected q's device"):
        dk.attention(q, k, v, attn_mask=m.to("meta"), enable_gqa=True)
    with pytest.raises(TypeError, match=r"attn_mask must be a Tensor or None, got list"):
        dk.attention(q, k, v, attn_mask=[1], enable_gqa=True)
    # a constant: no gradient, no tangent
    mf = additive(m, torch.float32)
    with pytest.raises(RuntimeError, match=r"attention: attn_mask requires grad, but rope_cos, rope_sin and "
                                           r"attn_mask are constants"):
        dk.attention(q, k, v, attn_mask=mf.clone().requires_grad_(), enable_gqa=True)
    with pytest.raises(RuntimeError, match=r"attention: attn_mask carries a forward-mode tangent"):
        torch.func.jvp(lambda a, mm: dk.attention(a, k, v, attn_mask=mm, enable_gqa=True), (q, mf), (q, mf))
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match=r"attention: attn_mask carries a forward-mode tangent"):
            dk.jvp.attention(q, k, v, q, None, None, attn_mask=fwAD.make_dual(mf, mf), enable_gqa=True)


def test_attention_all_true_mask_is_dropped(device, monkeypatch):
    from dmf_kernels import attention_mask

    q, k, v = inputs(1, 2, 2, 9, 13, 16, device, torch.float32)
    assert attention_mask.drop_all_true(torch.ones(1, 1, 1, 13, dtype=torch.bool, device=device)) is None
    seen = []
    real = attention_mask.bias
    monkeypatch.setattr(attention_mask, "bias", lambda *a: seen.append(a) or real(*a))
    o = dk.attention(q, k, v, attn_mask=torch.ones(9, 13, dtype=torch.bool, device=device))
    assert not seen, "an all-True mask reached the kernels"
    torch.testing.assert_close(o, dk.attention(q, k, v), rtol=0, atol=0)
    dk.attention(q, k, v, attn_mask=padding_mask(1, 9, 13, device, "rows"))
    assert len(seen) == 1


@pytest.mark.parametrize("shape", [(0, 4, 2, 5, 5), (2, 0, 0, 5, 5), (2, 4, 2, 0, 5), (2, 4, 2, 0, 0)], ids=str)
def test_attention_mask_gqa_empty(device, shape):
    B, H, HKV, NQ, NK = shape
    q, k, v = inputs(B, H, HKV, NQ, NK, 16, device, torch.float32)
    mask = torch.ones(B, 1, NQ, NK, dtype=torch.bool, device=device)
    if mask.numel():
        mask[..., 0] = False
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    o = dk.attention(*xs, attn_mask=mask, enable_gqa=True)
    assert o.shape == (B, H, NQ, 16)
    for g, x in zip(torch.autograd.grad(o, xs, torch.ones_like(o)), (q, k, v)):
        assert g.shape == x.shape and (g == 0).all()
    o, t = dk.jvp.attention(q, k, v, q, k, v, attn_mask=mask, enable_gqa=True)
    assert o.shape == t.shape == (B, H, NQ, 16)


class _Launches:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid, args, kwargs))


def test_triton_launch_gqa_and_mask_arguments(monkeypatch):
    # What the launchers hand the kernels (recorded, not run): k and v themselves under GQA
    # (no repeat), the dK/dV grid over the kv heads, MASK 2 with zero query / head strides for
    # a key-padding mask, MASK 1 for a per-row mask, MASK 0 and GROUP 1 for the plain call.
    from dmf_kernels import attention_mask, attention_triton as at

    log = []
    for name in ("_attn_fwd_kernel", "_attn_jvp_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                 "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(at, name, _Launches(log, name))
    B, H, HKV, N, D = 2, 8, 2, 33, 64
    q = torch.empty(B, H, N, D, device="meta", dtype=torch.float16)
    k = torch.empty(B, HKV, N, D, device="meta", dtype=torch.float16)
    lse = torch.empty(B, H, N, device="meta")
    keys = attention_mask.bias(torch.ones(B, 1, 1, N, dtype=torch.bool, device="meta"), torch.float32)
    rows = attention_mask.bias(torch.ones(B, 1, N, N, dtype=torch.bool, device="meta"), torch.float32)
    at.attention_fwd(q, k, k, 0.1, mask=keys)
    at.attention_jvp(q, k, k, q, k, k, 0.1, mask=rows)
    at.attention_bwd(q, q, k, k, q, lse, 0.1, mask=keys)
    at.attention_fwd(q, q, q, 0.1)
    by = {}
    for name, grid, args, kwargs in log:
        by.setdefault(name, []).append((grid, args, kwargs))
    (g, args, kw), plain = by["_attn_fwd_kernel"]
    assert args[1] is k and args[2] is k and kw["GROUP"] == 4 and kw["MASK"] == 2
    assert args[7].shape == (B, H, N, N) and args[7].stride() == (N, 0, 0, 1)  # the bias, broadcast
    assert plain[2]["GROUP"] == 1 and plain[2]["MASK"] == 0
    (g, args, kw), = by["_attn_jvp_kernel"]
    assert kw["GROUP"] == 4 and kw["MASK"] == 1 and args[11].stride() == (N * N, 0, N, 1)
    (g, args, kw), = by["_attn_bwd_dkdv_kernel"]
    assert g[0] == B * HKV and kw["GROUP"] == 4 and kw["MASK"] == 2
    (g, args, kw), = by["_attn_bwd_dq_kernel"]
    assert g[0] == B * H and kw["GROUP"] == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_fully_masked_row_lse_is_inf(device, dtype):
    # The raw ops' lse of a fully masked row is +inf on every path (aten's CPU flash kernel,
    # which serves fp32 on the CPU, gives 0 there), in the forward and in the jvp.
    q, k, v = inputs(1, 2, 2, 7, 9, 16, device, dtype)
    mask = padding_mask(1, 7, 9, device, "rows")  # rows 1 and 3 have no key
    dead = ~mask.any(-1).expand(1, 2, 7)
    for lse in (torch.ops.dmf_kernels.attention_fwd(q, k, v, 0.25, attn_mask=mask)[1],
                torch.ops.dmf_kernels.attention_jvp(q, k, v, q, None, None, 0.25, attn_mask=mask)[2]):
        assert dead.any() and (lse[dead] == float("inf")).all(), lse
        assert torch.isfinite(lse[~dead]).all()


def test_attention_expanded_mask_stays_compact(device):
    # A key-padding mask passed already expanded to (B, H, NQ, NK) is read as (B, 1, 1, NK)
    # (no B * H * NQ * NK bias), with the same results as the compact one.
    from dmf_kernels import attention_mask

    B, H, NQ, NK = 2, 2, 11, 19
    keys = padding_mask(B, NQ, NK, device, "keys")
    expanded = keys.expand(B, H, NQ, NK)
    assert attention_mask.bias(expanded, torch.float32).shape == (B, 1, 1, NK)
    assert attention_mask.bias(additive(keys, torch.float32).expand(B, H, NQ, NK), torch.float32).shape == (B, 1, 1, NK)
    q, k, v = inputs(B, H, H, NQ, NK, 16, device, torch.float32)
    torch.testing.assert_close(dk.attention(q, k, v, attn_mask=expanded), dk.attention(q, k, v, attn_mask=keys),
                               rtol=0, atol=0)


def test_attention_gqa_per_head_mask_padded_head_dim(device):
    # A mask that differs per query head with GQA (the mask is indexed by the query head, k and v
    # by the kv head), at a head dim that is not a power of two (72: a padded column block).
    B, HKV, NQ, NK, D = 1, 1, 13, 40, 72
    mask = padding_mask(B, NQ, NK, device, "heads")  # (1, 2, NQ, NK): two query heads, one kv head
    for dtype in [torch.float64] + low_dtypes(device)[:1]:
        check(device, dtype, (B, 2, HKV, NQ, NK, D), mask, True, None)
