"""The attention at its edges (issue 24), through every entry point (eager forward and
backward, torch.func.jvp, forward_ad, the explicit jvp form, torch.compile) against the
float64 eager reference (attention_triton_helpers.ref_attention):

- a NaN in q, k, v or a rotary table gives NaN exactly where the reference does;
- a tangent or requires_grad on a rotary table raises, naming it;
- empty inputs (B, H, NQ = 0; NK = 0 with NQ = 0) give empty outputs, zero dk / dv.

float64 runs the PyTorch path; float32 / float16 the aten flash path on the CPU, the Triton
kernels on CUDA and, with TRITON_INTERPRET=1 (make test runs this file a second time with
it), on the CPU."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dmf_kernels as dk
from attention_triton_helpers import assert_nan_close, ref_attention
from conftest import rand


def dtypes(device):
    return [torch.float64, torch.float32, torch.float16]


def inputs(shape, device, dtype, seed=0):
    B, H, NQ, NK, D = shape
    return [rand(B, H, n, D, device=device, dtype=dtype, seed=seed + i) for i, n in enumerate((NQ, NK, NK))]


def tables(N, D, device, dtype=torch.float32):
    return rand(N, D, device=device, dtype=dtype, seed=50), rand(N, D, device=device, dtype=dtype, seed=51)


def every_entry_point(args, kwargs, tangents, device):
    """{what: tensor} of dk.attention(*args, **kwargs): o, dq, dk, dv (eager backward), the
    tangent under torch.func.jvp, forward_ad and the explicit jvp form; and the same of the
    float64 reference."""
    res = {}
    for name, fn, cast in (("ours", dk.attention, lambda t: t), ("ref", ref_attention, lambda t: t.double())):
        kw = {n: (cast(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kwargs.items()}
        xs = [cast(t).clone().requires_grad_() for t in args]
        tg = [cast(t) for t in tangents]
        out = fn(*xs, **kw)
        g = rand(*out.shape, device=device, dtype=out.dtype, seed=30)
        r = dict(o=out.detach(), **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, xs, g))))
        r["func.jvp"] = torch.func.jvp(lambda *a: fn(*a, **kw), tuple(cast(t) for t in args), tuple(tg))[1]
        with fwAD.dual_level():
            r["forward_ad"] = fwAD.unpack_dual(fn(*[fwAD.make_dual(cast(p), t) for p, t in zip(args, tg)], **kw)).tangent
        if name == "ours":
            r["jvp"] = dk.jvp.attention(*args, *tangents, **kw)[1]
        res[name] = r
    return res["ours"], res["ref"]


NAN_AT = {"q": (0, 1, 3, 5), "k": (0, 0, 4, 2), "v": (0, 1, 6, 7)}


@pytest.mark.parametrize("where", ["q", "k", "v", "q_dot", "k_dot", "v_dot", "rope_cos", "rope_sin"])
def test_attention_nan_in_nan_out(device, where):
    rope = where.startswith("rope")
    shape = (1, 2, 9, 9, 16) if rope else (1, 2, 8, 11, 16)
    for dtype in dtypes(device):
        q, k, v = inputs(shape, device, dtype)
        tangents = inputs(shape, device, dtype, seed=10)
        kwargs = dict(scale=0.4)
        if rope:
            kwargs["rope_cos"], kwargs["rope_sin"] = tables(9, 16, device)
            kwargs[where] = kwargs[where].clone()
            kwargs[where][4 if where == "rope_cos" else 2, 3] = float("nan")
        elif where.endswith("_dot"):
            i = "qkv".index(where[0])
            tangents[i] = tangents[i].clone()
            tangents[i][NAN_AT[where[0]]] = float("nan")
        else:
            t = dict(q=q, k=k, v=v)[where]
            t[NAN_AT[where]] = float("nan")
        ours, ref = every_entry_point((q, k, v), kwargs, tangents, device)
        assert any(r.isnan().any() for r in ref.values())
        for what, r in ref.items():
            if where.endswith("_dot") and what in ("o", "dq", "dk", "dv"):
                continue  # a tangent does not reach the primal
            assert_nan_close(ours[what], r, f"{dtype} NaN in {where}: {what}")
        if "jvp" in ours:
            assert_nan_close(ours["jvp"], ref["func.jvp"], f"{dtype} NaN in {where}: jvp form")


def test_attention_nan_compiled(device):
    torch._dynamo.reset()
    q, k, v = inputs((1, 2, 8, 11, 16), device, torch.float32)
    tangents = inputs((1, 2, 8, 11, 16), device, torch.float32, seed=10)
    q[NAN_AT["q"]] = float("nan")
    f = torch.compile(lambda *a: torch.func.jvp(dk.attention, a[:3], a[3:]), fullgraph=True)
    o, t = f(q, k, v, *tangents)
    ro, rt = torch.func.jvp(ref_attention, tuple(x.double() for x in (q, k, v)), tuple(x.double() for x in tangents))
    assert_nan_close(o, ro, "compiled o")
    assert_nan_close(t, rt, "compiled tangent")


@pytest.mark.parametrize("table", ["rope_cos", "rope_sin"])
def test_attention_tables_are_constants(device, table):
    q, k, v = inputs((1, 2, 9, 9, 16), device, torch.float32)
    cos, sin = tables(9, 16, device)
    t = dict(rope_cos=cos, rope_sin=sin)
    other = "rope_sin" if table == "rope_cos" else "rope_cos"
    msg = rf"attention: {table} carries a forward-mode tangent, but rope_cos, rope_sin and attn_mask are constants"

    def with_table(x):
        return {table: x, other: t[other]}

    with pytest.raises(RuntimeError, match=msg):  # a tangent on the table only
        torch.func.jvp(lambda c: dk.attention(q, k, v, **with_table(c)), (t[table],), (torch.ones_like(t[table]),))
    with pytest.raises(RuntimeError, match=msg):
        torch.func.jvp(lambda a, c: dk.attention(a, k, v, **with_table(c)), (q, t[table]), (q, t[table]))
    with fwAD.dual_level():
        dual = fwAD.make_dual(t[table], t[table])
        with pytest.raises(RuntimeError, match=msg):
            dk.attention(q, k, v, **with_table(dual))
        with pytest.raises(RuntimeError, match=msg):
            dk.attention(fwAD.make_dual(q, q), k, v, **with_table(dual))
        with pytest.raises(RuntimeError, match=msg):
            dk.jvp.attention(q, k, v, q, None, None, **with_table(dual))
    msg = rf"attention: {table} requires grad, but rope_cos, rope_sin and attn_mask are constants"
    for x in (q, q.clone().requires_grad_()):
        with pytest.raises(RuntimeError, match=msg):
            dk.attention(x, k, v, **with_table(t[table].clone().requires_grad_()))
        with pytest.raises(RuntimeError, match=msg):
            dk.jvp.attention(x, k, v, q, None, None, **with_table(t[table].clone().requires_grad_()))
    with torch.no_grad():  # nothing to differentiate: allowed
        dk.attention(q, k, v, **with_table(t[table].clone().requires_grad_()))
    torch._dynamo.reset()
    f = torch.compile(lambda a, c: torch.func.jvp(lambda x, y: dk.attention(x, k, v, **with_table(y)), (a, c), (a, c)))
    with pytest.raises(RuntimeError, match=r"carries a forward-mode tangent"):
        f(q, t[table])


# (B, H, NQ, NK): each empty case; NK = 0 is legal only with NQ = 0
EMPTY = [(0, 2, 5, 5), (1, 0, 5, 5), (2, 2, 0, 5), (2, 2, 0, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("shape", EMPTY, ids=str)
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_attention_empty(device, shape, rope):
    B, H, NQ, NK = shape
    if rope and NQ != NK:
        return  # rotary embedding is self-attention only (test_attention.py checks the error)
    for dtype in (torch.float64, torch.float32):
        q, k, v = inputs((B, H, NQ, NK, 16), device, dtype)
        qd, kd, vd = inputs((B, H, NQ, NK, 16), device, dtype, seed=3)
        kw = dict(zip(("rope_cos", "rope_sin"), tables(NQ, 16, device))) if rope else {}
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        o = dk.attention(*xs, **kw)
        assert o.shape == (B, H, NQ, 16) and o.dtype == dtype
        grads = torch.autograd.grad(o, xs, torch.ones_like(o), allow_unused=False)
        for gr, x in zip(grads, (q, k, v)):
            assert gr.shape == x.shape and (gr == 0).all()  # no query: dk, dv are zero
        for o2, t in (dk.jvp.attention(q, k, v, qd, kd, vd, **kw), torch.func.jvp(
                lambda *a: dk.attention(*a, **kw), (q, k, v), (qd, kd, vd))):
            assert o2.shape == t.shape == (B, H, NQ, 16)
        with fwAD.dual_level():
            t = fwAD.unpack_dual(dk.attention(fwAD.make_dual(q, qd), k, v, **kw)).tangent
        assert t.shape == (B, H, NQ, 16)


def test_attention_empty_raw_ops(device):
    # the raw ops directly (torch.compile's path): empty outputs, no launch
    q, k, v = inputs((0, 2, 5, 5, 16), device, torch.float32)
    o, lse = torch.ops.dmf_kernels.attention_fwd(q, k, v, 0.25)
    assert o.shape == (0, 2, 5, 16) and lse.shape == (0, 2, 5)
    o, t, lse = torch.ops.dmf_kernels.attention_jvp(q, k, v, q, None, None, 0.25)
    assert o.shape == t.shape == (0, 2, 5, 16)
    dq, dkk, dv = torch.ops.dmf_kernels.attention_bwd(o, q, k, v, o, lse, 0.25)
    assert dq.shape == q.shape and dkk.shape == k.shape and dv.shape == v.shape
