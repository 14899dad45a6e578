"""Loads dmf_kernels._C (which registers torch.ops.dmf_kernels.*) and adds, per raw op:

- a fake (meta) kernel, so torch.compile and FakeTensor tracing see output shapes;
- an autograd formula: the primal outputs of the _fwd and _jvp ops backpropagate through
  the _bwd kernels; everything else (tangent and statistic outputs, the _bwd and _tangent
  ops) raises when a gradient reaches it. Without a formula PyTorch would let a backward
  pass run through them and silently drop the gradient.
"""
import torch


def _check_cpu_arch():
    # Read before importing _C: the build may use AVX2 instructions at load time.
    import os

    try:
        from ._build_config import CPU_ARCH
    except ImportError:  # built by CMake or by hand: baseline code
        CPU_ARCH = "none"
    if CPU_ARCH == "avx2" and os.path.exists("/proc/cpuinfo"):
        flags = set()
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
        missing = {"avx2", "fma", "f16c"} - flags
        if flags and missing:
            raise ImportError(
                f"dmf_kernels was built for AVX2 CPUs but this CPU lacks {sorted(missing)}; "
                "rebuild with DMF_KERNELS_CPU_ARCH=none pip install --no-build-isolation ."
            )


_check_cpu_arch()

from . import _C  # noqa: E402,F401  (registers the ops)

ops = torch.ops.dmf_kernels


def build_info() -> dict:
    """What the compiled extension contains: cpu, cuda, cuda_archs, versions, debug."""
    return dict(_C.build_info())


def _rows(x):
    return x.new_empty(x.shape)


def _stats(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _like(t):
    return t.new_empty(t.shape)


_FAKES = {
    "adaln_modulate_fwd": lambda x, shift, scale, eps: (_rows(x), _stats(x), _stats(x)),
    "adaln_modulate_bwd": lambda g, x, scale, mean, rstd: (_rows(x), _like(scale), _like(scale)),
    "adaln_modulate_jvp": lambda x, xd, sh, shd, sc, scd, eps: (_rows(x), _rows(x), _stats(x), _stats(x)),
    "adaln_modulate_tangent": lambda x, xd, shd, sc, scd, mean, rstd: _rows(x),
    "gated_residual_adaln_fwd": lambda x, gate, y, sh, sc, eps: (_rows(x), _rows(x), _stats(x), _stats(x)),
    "gated_residual_adaln_bwd": lambda gxo, gh, xo, gate, y, sc, mean, rstd: (
        _rows(xo), _like(gate), _rows(xo), _like(sc), _like(sc)),
    "gated_residual_adaln_jvp": lambda x, xd, gate, gd, y, yd, sh, shd, sc, scd, eps: (
        _rows(x), _rows(x), _rows(x), _rows(x), _stats(x), _stats(x)),
    "gated_residual_adaln_tangent": lambda xo, xd, gate, gd, y, yd, shd, sc, scd, mean, rstd: (_rows(xo), _rows(xo)),
    "gated_residual_fwd": lambda x, gate, y: _rows(x),
    "gated_residual_bwd": lambda g, gate, y: (_like(gate), _rows(y)),
    "gated_residual_jvp": lambda x, xd, gate, gd, y, yd: (_rows(x), _rows(x)),
    "gated_residual_tangent": lambda xd, gate, gd, y, yd: _rows(y),
    "rms_norm_fwd": lambda x, w, eps: (_rows(x), _stats(x)),
    "rms_norm_bwd": lambda g, x, w, rstd: (_rows(x), _like(w)),
    "rms_norm_jvp": lambda x, xd, w, wd, eps: (_rows(x), _rows(x), _stats(x)),
    "rms_norm_tangent": lambda x, xd, w, wd, rstd: _rows(x),
}

RAW_OPS = tuple(_FAKES)


def _no_derivative(name):
    public = name.rsplit("_", 1)[0]

    def setup_context(ctx, inputs, output):
        ctx.n_inputs = len(inputs)
        ctx.set_materialize_grads(False)  # an unused output must not arrive as zeros and raise

    def backward(ctx, *grads):
        if all(g is None for g in grads) or torch.compiler.is_compiling():
            return (None,) * ctx.n_inputs
        raise RuntimeError(
            f"dmf_kernels::{name} has no derivative. Differentiate dmf_kernels.{public} "
            f"(or dmf_kernels.jvp.{public}) instead; derivatives of tangents and double "
            "backward are not supported."
        )

    return setup_context, backward


# The primal outputs of the _fwd and _jvp ops are differentiable w.r.t. the primal inputs
# (torch.compile differentiates the raw ops directly when it traces forward-mode AD).
# Each entry: (input index of every saved tensor or ("out", k) for outputs,
#              indices of the primal outputs, function(saved, primal grads) -> input grads).
def _adaln_grads(saved, g, n_inputs, at):
    x, scale, mean, rstd = saved
    dx, dshift, dscale = ops.adaln_modulate_bwd(g[0], x, scale, mean, rstd)
    grads = [None] * n_inputs
    for name, value in zip(("x", "shift", "scale"), (dx, dshift, dscale)):
        grads[at[name]] = value
    return grads


def _residual_adaln_grads(saved, g, n_inputs, at):
    x_out, gate, y, scale, mean, rstd = saved
    g_xo = torch.zeros_like(x_out) if g[0] is None else g[0]
    g_h = torch.zeros_like(x_out) if g[1] is None else g[1]
    dx, dgate, dy, dshift, dscale = ops.gated_residual_adaln_bwd(g_xo, g_h, x_out, gate, y, scale, mean, rstd)
    grads = [None] * n_inputs
    for name, value in zip(("x", "gate", "y", "shift", "scale"), (dx, dgate, dy, dshift, dscale)):
        grads[at[name]] = value
    return grads


def _residual_grads(saved, g, n_inputs, at):
    gate, y = saved
    dgate, dy = ops.gated_residual_bwd(g[0], gate, y)
    grads = [None] * n_inputs
    grads[at["x"]], grads[at["gate"]], grads[at["y"]] = g[0], dgate, dy
    return grads


def _rms_grads(saved, g, n_inputs, at):
    x, weight, rstd = saved
    dx, dweight = ops.rms_norm_bwd(g[0], x, weight, rstd)
    grads = [None] * n_inputs
    grads[at["x"]], grads[at["weight"]] = dx, dweight
    return grads


_PRIMAL_AUTOGRAD = {
    # name: (saved: input index or ("out", k); primal output indices; grads fn; input positions)
    "adaln_modulate_fwd": ((0, 2, ("out", 1), ("out", 2)), (0,), _adaln_grads, dict(x=0, shift=1, scale=2)),
    "adaln_modulate_jvp": ((0, 4, ("out", 2), ("out", 3)), (0,), _adaln_grads, dict(x=0, shift=2, scale=4)),
    "gated_residual_adaln_fwd": ((("out", 0), 1, 2, 4, ("out", 2), ("out", 3)), (0, 1), _residual_adaln_grads,
                                 dict(x=0, gate=1, y=2, shift=3, scale=4)),
    "gated_residual_adaln_jvp": ((("out", 0), 2, 4, 8, ("out", 4), ("out", 5)), (0, 2), _residual_adaln_grads,
                                 dict(x=0, gate=2, y=4, shift=6, scale=8)),
    "gated_residual_fwd": ((1, 2), (0,), _residual_grads, dict(x=0, gate=1, y=2)),
    "gated_residual_jvp": ((2, 4), (0,), _residual_grads, dict(x=0, gate=2, y=4)),
    "rms_norm_fwd": ((0, 1, ("out", 1)), (0,), _rms_grads, dict(x=0, weight=1)),
    "rms_norm_jvp": ((0, 2, ("out", 2)), (0,), _rms_grads, dict(x=0, weight=2)),
}


def _primal_autograd(name, saved_spec, primal_outputs, grads_fn, at):
    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.saved = [outs[i[1]] if isinstance(i, tuple) else inputs[i] for i in saved_spec]
        ctx.n_inputs = len(inputs)
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        for k, g in enumerate(grads):
            # Under torch.compile, AOTAutograd hands a gradient placeholder to every output
            # of the traced graph, used or not, so this check only runs in eager.
            if k not in primal_outputs and g is not None and not torch.compiler.is_compiling():
                raise RuntimeError(
                    f"dmf_kernels::{name}: output {k} (a tangent or a statistic) received a gradient; "
                    "only the primal outputs are differentiable."
                )
        if all(grads[k] is None for k in primal_outputs):
            return (None,) * ctx.n_inputs
        g = [grads[k] for k in primal_outputs]
        if len(g) == 1 and g[0] is None:
            return (None,) * ctx.n_inputs
        return tuple(grads_fn(ctx.saved, g, ctx.n_inputs, at))

    return setup_context, backward


def _same_device(name, fake):
    # The compiled ops check devices themselves; a fake kernel must too, or a mix such as
    # CPU and meta tensors would trace without complaint.
    def checked(*args):
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        if len(devices) > 1:
            raise RuntimeError(
                f"dmf_kernels::{name}: all tensors must be on x's device, got {sorted(map(str, devices))}"
            )
        return fake(*args)

    return checked


for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"dmf_kernels::{_name}", _same_device(_name, _fake))
    if _name in _PRIMAL_AUTOGRAD:
        _setup, _backward = _primal_autograd(_name, *_PRIMAL_AUTOGRAD[_name])
        torch.library.register_autograd(f"dmf_kernels::{_name}", _backward, setup_context=_setup)
    else:
        _setup, _backward = _no_derivative(_name)
        torch.library.register_autograd(f"dmf_kernels::{_name}", _backward, setup_context=_setup)


def dual_inputs(*tensors):
    """Forward-mode AD, detected from inside an op.

    When any input carries a tangent at the current forward-AD level (torch.func.jvp,
    forward_ad, jacfwd; eager or under torch.compile), returns (primals, tangents) so the op
    can compute both with its one-pass dual kernel and re-wrap the outputs with make_dual;
    returns None when no input has a tangent. Every public op routes forward-mode AD this
    way: one kernel pass instead of a primal kernel followed by a tangent kernel; and under
    torch.compile, Dynamo refuses autograd.Functions that define `jvp` while without one it
    silently drops the tangent (pytorch issue 192985; measured here: zero tangents from a
    compiled torch.func.jvp). The Functions' own jvp methods remain as a fallback for
    forward-mode AD this detection does not see.
    """
    import torch.autograd.forward_ad as fwAD

    unpacked = [None if t is None else fwAD.unpack_dual(t) for t in tensors]
    tangents = [None if u is None else u.tangent for u in unpacked]
    if all(t is None for t in tangents):
        return None
    primals = [None if u is None else u.primal for u in unpacked]
    return primals, tangents


def needs_grad(*tensors):
    """Whether autograd must record this call. When it need not (sampling under no_grad,
    frozen inputs), the public ops call the raw op directly: autograd.Function.apply costs
    ~15 us of Python per call (23 vs 6.5 us for adaln_modulate on a tiny input), comparable to
    a whole memory-bound kernel at DiT shapes on an H100."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _TangentGuard(torch.autograd.Function):
    """Identity on a forward-mode tangent whose backward raises. The one-pass kernels do not
    differentiate tangents; without this, a loss that used a non-detached tangent (eager
    torch.func.jvp tangents are differentiable) would silently miss that gradient. Saves
    nothing, so it costs no activation memory. Its forward is a view, so vmap (jacfwd,
    vmap over jvp) can batch it with the generated rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name, tangent, *inputs):
        return tangent.view_as(tangent)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]
        ctx.n_inputs = len(inputs) - 2
        # Unmaterialised: a consumer that returns None for the tangent (our dual Functions)
        # must not arrive here as a zero tensor and trip the error.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return (None,) * (len(grads) + 1 + ctx.n_inputs)
        raise RuntimeError(
            f"dmf_kernels.{ctx.name}: gradients through forward-mode tangents are not supported; "
            "detach the tangent (as MeanFlow's stopgrad target does)"
        )


def make_duals(primals, tangents, name=None, inputs=()):
    """Wraps (primal, tangent) pairs as dual tensors of the current forward-AD level. In eager,
    when `inputs` require grad, tangents are guarded so that backprop into them raises."""
    import torch.autograd.forward_ad as fwAD

    # Inside torch.func.jvp the inputs do not report requires_grad, so the guard is applied
    # whenever grad mode is on; autograd drops it where nothing requires grad.
    guard = name is not None and not torch.compiler.is_compiling() and torch.is_grad_enabled()
    if guard:
        tangents = [_TangentGuard.apply(name, t, *inputs) for t in tangents]
    return tuple(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))

