"""The Triton side of the machine-code inspection (inspect_kernels.py): the launches the
attention and gelu launchers make, recorded with meta tensors from the kernel files loaded
alone, and their ahead-of-time compile for a target with no GPU attached."""
import importlib
import sys

from inspect_common import HEAD_DIMS, REF_B, REF_H, REF_N, ROOT, _ptx_stats, _ptxas


_STANDALONE = "_dmf_kernels_triton_only"


def _load_triton_module(name):
    # Load the Triton module files alone: importing dmf_kernels would load the compiled
    # extension, built against the main venv. They live in a stand-in package whose __init__
    # never runs, so their relative imports (the launchers import the kernel files) resolve
    # to the files beside them and to nothing else.
    import types

    if _STANDALONE not in sys.modules:
        pkg = types.ModuleType(_STANDALONE)
        pkg.__path__ = [str(ROOT / "dmf_kernels")]
        sys.modules[_STANDALONE] = pkg
    sys.modules.pop(f"{_STANDALONE}.{name}", None)  # a fresh copy: callers patch its launch hooks
    return importlib.import_module(f"{_STANDALONE}.{name}")


def _load_attention_triton():
    return _load_triton_module("attention_triton")


class _Recorder:
    """Stands in for a @triton.jit kernel in the launcher module: records kernel[grid](...)."""

    def __init__(self, name, fn, log):
        self.name, self.fn, self.log = name, fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, self.fn, grid, args, kwargs))
        return launch


class _FakePtr:
    # What Triton's binder needs of a tensor: data_ptr (torch allocations are 256-byte
    # aligned; 0 stands for that) and dtype.
    def __init__(self, t):
        self.dtype = t.dtype

    def data_ptr(self):
        return 0


def _layout_tensors(torch, layout, B, H, N, D, dtype, count):
    if layout == "contig":
        return [torch.empty(B, H, N, D, dtype=dtype, device="meta") for _ in range(count)]
    # fused qkv projection (B, N, 3, H, D), viewed as (B, H, N, D): strides (3HDN, D, 3HD, 1)
    out = []
    for _ in range(0, count, 3):
        proj = torch.empty(B, N, 3, H, D, dtype=dtype, device="meta")
        out += [proj[:, :, i].permute(0, 2, 1, 3) for i in range(3)]
    return out[:count]


def triton_launches(cc=90, B=REF_B, H=REF_H, N=REF_N):
    """[(kernel, dtype, D, layout, name, fn, grid, args, kwargs, bytes)] for every launch the
    launchers make for compute capability cc (their tile choice may depend on it)."""
    import torch

    at = _load_attention_triton()
    at._capability = lambda t: (cc // 10, cc % 10)
    log = []
    for name in ("_attn_fwd_kernel", "_attn_jvp_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                 "_attn_bwd_dq_kernel"):
        setattr(at, name, _Recorder(name, getattr(at, name), log))
    out = []
    # fp32 follows torch.get_float32_matmul_precision(): "highest" -> ieee, "high" -> tf32x3
    old_prec = torch.get_float32_matmul_precision()
    for dtype, prec in ((torch.bfloat16, None), (torch.float16, None), (torch.float32, "highest"),
                        (torch.float32, "high")):
        if prec:
            torch.set_float32_matmul_precision(prec)
        label = str(dtype).replace("torch.", "") + {"highest": "/ieee", "high": "/tf32x3", None: ""}[prec]
        es = dtype.itemsize
        for D in HEAD_DIMS if not prec else (64, 72):  # fp32 is not hot: two head dims, contiguous
            row = B * H * N * D * es  # one (B, H, N, D) tensor
            stat = B * H * N * 4  # lse / delta
            for layout in ("contig", "fused") if not prec else ("contig",):
                q, k, v = _layout_tensors(torch, layout, B, H, N, D, dtype, 3)
                qd, kd, vd = _layout_tensors(torch, layout, B, H, N, D, dtype, 3)
                scale = D ** -0.5
                tab = torch.empty(N, D, dtype=torch.float32, device="meta")
                rope, tab_bytes = (tab, tab), 2 * N * D * 4  # rotary tables (cos, sin), fp32
                calls = [
                    (lambda: at.attention_fwd(q, k, v, scale), {"_attn_fwd_kernel": 4 * row + stat}),
                    (lambda: at.attention_jvp(q, k, v, qd, kd, vd, scale), {"_attn_jvp_kernel": 8 * row + stat}),
                    (lambda: at.attention_bwd(torch.empty(B, H, N, D, dtype=dtype, device="meta"), q, k, v,
                                              torch.empty(B, H, N, D, dtype=dtype, device="meta"),
                                              torch.empty(B, H, N, dtype=torch.float32, device="meta"), scale),
                     {"_attn_bwd_preprocess_kernel": 2 * row + stat,
                      "_attn_bwd_dkdv_kernel": 6 * row + 2 * stat,  # q k v do read, dk dv written
                      "_attn_bwd_dq_kernel": 5 * row + 2 * stat}),
                ]
                if not prec:  # the rope variants (rows "+rope"): 16-bit only, the hot ones
                    calls += [
                        (lambda: at.attention_fwd(q, k, v, scale, rope=rope),
                         {"_attn_fwd_kernel": 4 * row + stat + tab_bytes}),
                        (lambda: at.attention_jvp(q, k, v, qd, kd, vd, scale, rope=rope),
                         {"_attn_jvp_kernel": 8 * row + stat + tab_bytes}),
                        (lambda: at.attention_bwd(torch.empty(B, H, N, D, dtype=dtype, device="meta"), q, k, v,
                                                  torch.empty(B, H, N, D, dtype=dtype, device="meta"),
                                                  torch.empty(B, H, N, dtype=torch.float32, device="meta"), scale,
                                                  rope=rope),  # its preprocess launch is the plain one's
                         {"_attn_bwd_dkdv_kernel": 6 * row + 2 * stat + tab_bytes,
                          "_attn_bwd_dq_kernel": 5 * row + 2 * stat + tab_bytes}),
                    ]
                if not prec and layout == "contig" and D in (72, 128):
                    calls += _feature_calls(torch, at, B, H, N, D, dtype, q, k, v, qd, kd, vd, scale, row, stat)
                for call, nbytes in calls:
                    log.clear()
                    call()
                    for name, fn, grid, args, kwargs in log:
                        if name not in nbytes:
                            continue
                        suffix = "+rope" if kwargs.get("ROPE") else ""
                        suffix += {0: "", 1: "+mask", 2: "+keymask"}[kwargs.get("MASK", 0)]
                        suffix += "+gqa" if kwargs.get("GROUP", 1) > 1 else ""
                        out.append(dict(kernel=name.strip("_").removesuffix("_kernel") + suffix,
                                        dtype=label, D=D, layout=layout, fn=fn,
                                        grid=grid, args=args, kwargs=kwargs, bytes=nbytes[name]))
    torch.set_float32_matmul_precision(old_prec)
    # gelu_tanh's one-pass dual (the MLP activation of DiT-XL/2: B * N * 4 * 1152 elements)
    gt = _load_triton_module("gelu_triton")
    gt._gelu_tanh_jvp_kernel = _Recorder("_gelu_tanh_jvp_kernel", gt._gelu_tanh_jvp_kernel, log)
    n = B * N * 4 * 1152
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        log.clear()
        a = torch.empty(n, dtype=dtype, device="meta")
        gt.gelu_tanh_jvp(a, a)
        for name, fn, grid, args, kwargs in log:
            out.append(dict(kernel="gelu_tanh_jvp", dtype=str(dtype).replace("torch.", ""), D=4 * 1152,
                            layout="contig", fn=fn, grid=grid, args=args, kwargs=kwargs,
                            bytes=4 * n * dtype.itemsize))
    return out


def _feature_calls(torch, at, B, H, N, D, dtype, q, k, v, qd, kd, vd, scale, row, stat):
    """The mask and grouped-query variants (rows "+mask", "+keymask", "+gqa"), 16-bit, contiguous,
    at D = 72 (DiT-XL) and 128 (Flux, SD3): a (B, 1, N, N) fp32 bias, a key-padding bias
    (B, 1, 1, N) and k, v with H / 4 heads. Their bytes add the bias once per query head
    (the full mask) or once (key padding); GQA reads a quarter of k and v."""
    meta = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    full, keys = meta(B, 1, N, N, dt=torch.float32), meta(B, 1, 1, N, dt=torch.float32)
    kg, vg, kdg, vdg = (meta(B, H // 4, N, D) for _ in range(4))
    calls = []
    for mask, extra in ((full, B * H * N * N * 4), (keys, B * N * 4)):
        calls += [
            (lambda m=mask: at.attention_fwd(q, k, v, scale, mask=m), {"_attn_fwd_kernel": 4 * row + stat + extra}),
            (lambda m=mask: at.attention_jvp(q, k, v, qd, kd, vd, scale, mask=m),
             {"_attn_jvp_kernel": 8 * row + stat + extra}),
            (lambda m=mask: at.attention_bwd(meta(B, H, N, D), q, k, v, meta(B, H, N, D),
                                             meta(B, H, N, dt=torch.float32), scale, mask=m),
             {"_attn_bwd_dkdv_kernel": 6 * row + 2 * stat + extra, "_attn_bwd_dq_kernel": 5 * row + 2 * stat + extra}),
        ]
    quarter = row // 4
    calls += [
        (lambda: at.attention_fwd(q, kg, vg, scale), {"_attn_fwd_kernel": 2 * row + 2 * quarter + stat}),
        (lambda: at.attention_jvp(q, kg, vg, qd, kdg, vdg, scale), {"_attn_jvp_kernel": 4 * row + 4 * quarter + stat}),
        (lambda: at.attention_bwd(meta(B, H, N, D), q, kg, vg, meta(B, H, N, D), meta(B, H, N, dt=torch.float32),
                                  scale),
         {"_attn_bwd_dkdv_kernel": 2 * row + 4 * quarter + 2 * stat, "_attn_bwd_dq_kernel": 3 * row + 2 * quarter
          + 2 * stat}),
    ]
    return calls


_LAUNCHES = []  # set before the worker pool forks (JIT functions do not pickle)


def compile_triton(i, cc):
    """Compiles recorded launch i for compute capability cc; returns its row."""
    launch = _LAUNCHES[i]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch["fn"]
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_FakePtr(a) if hasattr(a, "data_ptr") else a for a in launch["args"]]
    kwargs = dict(launch["kwargs"])
    kwargs.setdefault("debug", False)
    bound, spec, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, None)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = k.asm["ptx"]
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    info = next(iter(_ptxas(ptx, arch).values()))
    info["smem"] = max(info["smem"], k.metadata.shared)
    kw = launch["kwargs"]
    cfg = f"{kw.get('BLOCK_M', '')}x{kw.get('BLOCK_N', '')} w{kw.get('num_warps', 4)} s{kw.get('num_stages', 3)}"
    if "BLOCK_N" not in kw:
        cfg = f"{kw.get('BLOCK_M')} w{kw.get('num_warps', 4)}"
    return dict(kernel=launch["kernel"], dtype=launch["dtype"], D=launch["D"], layout=launch["layout"], cfg=cfg,
                bytes=launch["bytes"], **info, **_ptx_stats(ptx))
