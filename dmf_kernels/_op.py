"""One declaration per op: `Op(...)` turns a pair of raw ops (a primal op and a one-pass jvp op)
and one backward formula into everything the public API needs.

    torch.ops.dmf_kernels.<op>_fwd    raw primal op: (inputs..., params...) -> (outputs..., stats...)
    torch.ops.dmf_kernels.<op>_jvp    raw jvp op, arguments in any order, found by schema name
                                      (`x`, `x_dot`, ..., params); returns each output followed by
                                      its tangent, then the stats: (out, out_dot, ..., stats...)
    torch.ops.dmf_kernels.<op>_bwd    raw backward op, called by the declared backward formula
    Op(...).fn                        public, differentiable: dmf_kernels.<op>
    Op(...).jvp = fn.jvp              public jvp form: dmf_kernels.jvp.<op>
    Op(...).maybe_jvp = fn.maybe_jvp  the same, but every tangent None gives None tangents (the
                                      primal op at its own cost): what dmf_kernels.nn composes

What the builder adds, so that no op writes it again:
- autograd on the raw _fwd and _jvp ops (torch.library.register_autograd): the declared primal
  outputs backpropagate through the declared backward formula; a gradient reaching a tangent
  or a statistic raises in eager (silently dropping it would be worse); the _bwd ops get an
  autograd that raises (no double backward). torch.compile differentiates the raw ops with it
  when it traces forward-mode AD; the public functions use one generated autograd.Function
  per raw op with the same setup_context and backward (see Op._function for why).
- fake kernels for the C++ ops (outputs like the first input, stats one per row) with a
  same-device check;
- forward-mode AD in `fn`: when an input carries a tangent (torch.func.jvp, forward_ad, jacfwd,
  eager or compiled) the raw jvp op runs once and its results are re-wrapped as dual tensors
  whose tangents raise if a gradient reaches them (see _forward_ad.py);
- `jvp`: tangents may be None (zero; the kernel skips that work); when all are None the primal
  op runs instead. Called by keyword, any tangent may be left out. Primal outputs stay differentiable, tangents are not recorded by autograd.

Optional inputs (`optional=`, e.g. rms_adaln_modulate's shift and weight): the input may be None,
which the op defines (a zero shift, a unit weight); a None input has no tangent (giving one raises)
and no gradient. Its schema type is `Tensor?`; in the public signatures it defaults to None when
no required input follows it. Fake kernels pass None through (a `_bwd` returns None for the
gradient of a None input, the C++ op an undefined tensor).

The link to C++ is by name: the argument names of the raw ops' schemas must be the declared
input names, their tangents `<name>_dot` and the params; `Op` checks this at import.
"""
import inspect
from types import SimpleNamespace

import torch
import torch.autograd.forward_ad as fwAD

from ._forward_ad import dual_inputs, make_duals

CPP_OPS = []  # names of the C++ raw ops declared so far (dmf_kernels.RAW_OPS)


class _TensorParam:
    def __repr__(self):
        return "TENSOR"


# The default of a tensor param in `Op(params=...)`: a required tensor argument that is a constant
# of the op (rope's cos / sin tables): no tangent, no gradient, saved with save_for_backward.
TENSOR = _TensorParam()


def _call(raw, function, tensors, args):
    """The raw op when autograd need not record the call (sampling under no_grad, frozen
    inputs): Function.apply costs ~15 us of Python, comparable to a whole memory-bound kernel
    at DiT shapes on an H100; else the op's Function."""
    # Under torch.compile the raw op with its registered autograd: AOTAutograd differentiates it
    # (also under forward-mode AD, which a traced autograd.Function would reject).
    if function is None or torch.compiler.is_compiling() or \
            not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return raw(*args)
    return function.apply(*args)


_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # a C call: 0.4 us measured on a loaded 2-core CPU


class _Signature(inspect.Signature):
    """A signature that also knows how many arguments are required (inspect's own has slots)."""

    __slots__ = ("n_required",)


def _schema_names(raw):
    return [a.name for a in raw.default._schema.arguments]


def _n_returns(raw):
    return len(raw.default._schema.returns)


def _same_device(name, fake):
    # The compiled ops check devices themselves; a fake kernel must too, or a mix such as CPU
    # and meta tensors would trace without complaint.
    def checked(*args):
        devices = {a.device for a in args if isinstance(a, torch.Tensor)}
        if len(devices) > 1:
            raise RuntimeError(f"{name}: all tensors must be on x's device, got {sorted(map(str, devices))}")
        return fake(*args)
    return checked


class Op:
    """One differentiable op. See the module docstring.

    Args:
        name: the public name (dmf_kernels.<name>, dmf_kernels.jvp.<name>).
        fwd: the raw primal op (or, for an aten primal such as gelu, any differentiable callable).
        jvp: the raw one-pass jvp op.
        inputs: tensor inputs that may carry tangents, in call order.
        optional: the inputs that may be None (see the module docstring).
        params: arguments after them that carry no tangent and get no gradient (scale, eps,
            attention's optional rope tables), with defaults; a default `TENSOR` declares a
            required constant tensor (rope's cos / sin tables): a dual tangent on it raises, and
            so does requires_grad (it would silently get no gradient).
        outputs: the differentiable outputs the public function returns.
        stats: further outputs of fwd/jvp (statistics for the backward), never differentiable.
        saved: names of inputs, outputs, stats and params the backward needs.
        backward: (saved, grads) -> {input name: gradient}; `saved` and `grads` (one per output,
            None when unused) are namespaces by name. The op's only backward formula.
        bwd: the raw backward op (its autograd raises; fake kernel from `grads_like`).
        grads_like: for C++ ops, the bwd argument each bwd output is shaped like.
        resolve: (primals, params) -> params, e.g. attention's default scale 1/sqrt(D).
        zero_tangents: whether `jvp` with every tangent None returns zero tangents (the C++
            ops' documented behaviour) or None (gelu: nothing computed).
        out_shape: x -> the shape of each output (and tangent) for the fake kernels of a C++ op whose
            outputs are not shaped like its first input x (swiglu: (..., 2H) -> (..., H)).
        doc: the public function's docstring, with shapes.
    """

    def __init__(self, name, *, fwd, jvp, inputs, outputs, saved, backward, params=None, stats=(), bwd=None,
                 grads_like=None, resolve=None, zero_tangents=True, optional=(), out_shape=None, doc=""):
        self.name, self.raw_fwd, self.raw_jvp = name, fwd, jvp
        self.inputs, self.outputs, self.stats = tuple(inputs), tuple(outputs), tuple(stats)
        self.optional = tuple(optional)
        if not set(self.optional) <= set(self.inputs):
            raise TypeError(f"Op {name}: optional {self.optional} must be among the inputs {self.inputs}")
        self.params = dict(params or {})
        self.tensor_params = tuple(n for n, d in self.params.items() if d is TENSOR)
        self._tensor_param_at = [i for i, n in enumerate(self.params) if n in self.tensor_params]
        if list(self.params)[:len(self.tensor_params)] != list(self.tensor_params):
            raise TypeError(f"Op {name}: TENSOR params must come before the params with defaults")
        self.out_shape = out_shape
        self.saved, self.backward, self.resolve, self.zero_tangents = tuple(saved), backward, resolve, zero_tangents
        n_out = len(self.outputs)
        tangent_names = [f"{n}_dot" for n in self.inputs]
        # Positions of the jvp op's arguments in primals + tangents + params, by schema name.
        values = list(self.inputs) + tangent_names + list(self.params)
        jvp_names = _schema_names(jvp)
        if sorted(jvp_names) != sorted(values):
            raise TypeError(f"Op {name}: {jvp} takes {jvp_names}, declared {values}")
        self._jvp_order = [values.index(n) for n in jvp_names]
        if _n_returns(jvp) != 2 * n_out + len(self.stats):
            raise TypeError(f"Op {name}: {jvp} must return (output, tangent) pairs, then {self.stats}")
        self._is_raw_fwd = isinstance(fwd, torch._ops.OpOverloadPacket)
        if self._is_raw_fwd and _schema_names(fwd) != list(self.inputs) + list(self.params):
            raise TypeError(f"Op {name}: {fwd} takes {_schema_names(fwd)}, declared {values}")
        # Public signatures: fn(inputs..., params=defaults), optional inputs after the last required
        # one defaulting to None; jvp in the raw jvp op's argument order, tangents and optional
        # inputs after the last required primal defaulting to None.
        P = inspect.Parameter
        required = [n for n in self.inputs if n not in self.optional]
        # (with TENSOR params after the inputs, every input stays positional)
        last_required = len(self.inputs) - 1 if self.tensor_params else max(self.inputs.index(n) for n in required)
        self._fn_sig = _Signature(
            [P(n, P.POSITIONAL_OR_KEYWORD) if i <= last_required else P(n, P.POSITIONAL_OR_KEYWORD, default=None)
             for i, n in enumerate(self.inputs)]
            + [P(n, P.POSITIONAL_OR_KEYWORD) for n in self.tensor_params]
            + [P(n, P.POSITIONAL_OR_KEYWORD, default=d) for n, d in self.params.items() if d is not TENSOR])
        # required up to the last required primal or tensor param (rope.jvp(x, x_dot, cos, sin):
        # x_dot too, it may be None but must be given)
        last_primal = max(jvp_names.index(n) for n in required + list(self.tensor_params))
        self._jvp_sig = _Signature([
            P(n, P.POSITIONAL_OR_KEYWORD) if i <= last_primal else
            P(n, P.POSITIONAL_OR_KEYWORD, default=self.params.get(n)) for i, n in enumerate(jvp_names)])
        self._jvp_defaults = [self.params.get(n) for n in jvp_names]
        for sig in (self._fn_sig, self._jvp_sig):
            sig.n_required = sum(1 for p in sig.parameters.values() if p.default is p.empty)
        self.fn = self._make_fn(doc)
        self.fn.jvp = self.jvp = self._make_jvp(self.zero_tangents)
        self.fn.maybe_jvp = self.maybe_jvp = self._make_jvp(False)
        # Autograd of the raw ops, and the Functions the public functions use (the same formulas).
        self._fwd_fn = self._register_autograd(fwd, list(self.outputs) + list(self.stats)) \
            if self._is_raw_fwd else None
        pairs = [n for o in self.outputs for n in (o, f"{o}_dot")]
        self._jvp_fn = self._register_autograd(jvp, pairs + list(self.stats))
        if bwd is not None:
            self._register_no_derivative(bwd)
        if grads_like is not None:
            self._register_fakes(fwd, jvp, bwd, grads_like)

    # ------------------------------------------------------------ calls

    @staticmethod
    def _bind(sig, args, kwargs, defaults):
        # The common call (all positional) without inspect's bind, which costs microseconds.
        if kwargs or not sig.n_required <= len(args) <= len(defaults):
            bound = sig.bind(*args, **kwargs)  # raises the usual TypeError
            bound.apply_defaults()
            return list(bound.args)
        return list(args) + defaults[len(args):]

    def _check_tensor_params(self, params):
        """A TENSOR param is a constant: a forward-mode tangent on it, or a gradient it would need,
        is not computed, so either raises here instead of being silently dropped."""
        for i in self._tensor_param_at:
            n, t = list(self.params)[i], params[i]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"dmf_kernels.{self.name}: {n} must be a Tensor, got {type(t).__name__}")
            if fwAD.unpack_dual(t).tangent is not None:
                raise RuntimeError(
                    f"dmf_kernels.{self.name}: {n} carries a forward-mode tangent, but "
                    f"{' and '.join(self.tensor_params)} are constant tables of the op (no tangent, no gradient); "
                    f"pass them outside torch.func.jvp's primals / without make_dual")
            if t.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(
                    f"dmf_kernels.{self.name}: {n} requires grad, but {' and '.join(self.tensor_params)} are constant "
                    f"tables of the op (no gradient is computed for them); pass {n}.detach()")

    def jvp_or_primal(self, primals, tangents, params):
        """(outputs, tangents of the outputs); all tangents None runs the primal op and returns
        None tangents. The tangents are not recorded by autograd."""
        if self.resolve is not None:
            params = self.resolve(primals, params)
        for n, p, t in zip(self.inputs, primals, tangents):
            if p is None and t is not None:
                raise ValueError(f"dmf_kernels.{self.name}: {n}_dot given without {n} (a None {n} has no tangent)")
        if all(t is None for t in tangents):
            # The public function, not the raw op: it still detects forward-mode tangents that the
            # caller did not unpack (under torch.compile a module's own check can miss them).
            res = self.fn(*primals, *params)
            return (res if isinstance(res, tuple) else (res,)), (None,) * len(self.outputs)
        values = [*primals, *tangents, *params]
        res = _call(self.raw_jvp, self._jvp_fn, primals, [values[i] for i in self._jvp_order])
        n = 2 * len(self.outputs)
        if torch.compiler.is_compiling():  # the raw op ran: its tangents are not marked constant
            return res[0:n:2], tuple(t.detach() for t in res[1:n:2])
        return res[0:n:2], res[1:n:2]

    def _make_fn(self, doc):
        n_in, single = len(self.inputs), len(self.outputs) == 1
        defaults = [None] * n_in + list(self.params.values())

        def fn(*args, **kwargs):
            args = self._bind(self._fn_sig, args, kwargs, defaults)
            tensors, params = args[:n_in], args[n_in:]
            if self._tensor_param_at:
                self._check_tensor_params(params)
            dual = dual_inputs(*tensors)
            if dual is None:
                if self.resolve is not None:
                    params = self.resolve(tensors, params)
                res = _call(self.raw_fwd, self._fwd_fn, tensors, [*tensors, *params])
                if not isinstance(res, tuple):
                    return res
                return res[0] if single else res[:len(self.outputs)]
            primals, tangents = dual
            outs, outs_dot = self.jvp_or_primal(primals, tangents, params)
            if not torch.compiler.is_compiling() and _is_legacy_batched(outs[0]) and \
                    not any(p is not None and _is_legacy_batched(p) for p in primals):
                # gradcheck's legacy vmap batched the primal outputs too, and cannot make duals of
                # them (no batching rule for aten::alias): the primal op gives them unbatched.
                outs = self.fn(*primals, *params)
                outs = outs if isinstance(outs, tuple) else (outs,)
            duals = make_duals(outs, outs_dot, self.name, tuple(p for p in primals if p is not None))
            return duals[0] if single else duals

        fn.__name__ = fn.__qualname__ = self.name
        fn.__doc__, fn.__signature__ = doc, self._fn_sig
        return fn

    def _make_jvp(self, zero_tangents):
        n_in = len(self.inputs)
        order = self._jvp_order
        jvp_names = list(self._jvp_sig.parameters)
        tangent_names = {f"{n}_dot" for n in self.inputs}

        def jvp(*args, **kwargs):
            if kwargs:  # by keyword any tangent may be left out (None), also one before a primal
                for n in jvp_names[len(args):]:
                    if n in tangent_names and n not in kwargs:
                        kwargs[n] = None
            args = self._bind(self._jvp_sig, args, kwargs, self._jvp_defaults)
            values = [None] * len(args)
            for pos, src in enumerate(order):
                values[src] = args[pos]
            if self._tensor_param_at:
                self._check_tensor_params(values[2 * n_in:])
            outs, outs_dot = self.jvp_or_primal(values[:n_in], values[n_in:2 * n_in], values[2 * n_in:])
            if zero_tangents and outs_dot[0] is None:
                outs_dot = [torch.zeros_like(o) for o in outs]
            return tuple(t for pair in zip(outs, outs_dot) for t in pair)

        outs = ", ".join(f"{o}, {o}_dot" for o in self.outputs)
        jvp.__name__ = jvp.__qualname__ = self.name
        jvp.__signature__ = self._jvp_sig
        jvp.__doc__ = (f"dmf_kernels.{self.name} and its tangent in one kernel pass -> ({outs}).\n\n"
                       f"Each `<input>_dot` is the tangent of that input (same shape, dtype and device) or None\n"
                       f"(zero: the kernel skips that work). The outputs are differentiable w.r.t. the primal\n"
                       f"inputs; the tangents are plain tensors, not recorded by autograd.")
        return jvp

    # ------------------------------------------------------------ autograd of the raw ops

    def _register_fakes(self, fwd, jvp, bwd, grads_like):
        """Fake kernels of a C++ op: _fwd/_jvp outputs like x and one statistic per row (fp32,
        fp64 for fp64); _bwd outputs shaped like the bwd arguments named in grads_like."""
        out_shape = self.out_shape or (lambda x: x.shape)

        def rows_fake(raw, n_rows):
            def fake(x, *args):
                stat = torch.float64 if x.dtype == torch.float64 else torch.float32
                outs = [x.new_empty(out_shape(x)) for _ in range(n_rows)]
                outs += [x.new_empty(x.shape[:-1], dtype=stat) for _ in range(_n_returns(raw) - n_rows)]
                return outs[0] if len(outs) == 1 else tuple(outs)
            return fake

        def bwd_fake(*args):
            named = dict(zip(_schema_names(bwd), args))
            outs = tuple(None if named[n] is None else named[n].new_empty(named[n].shape) for n in grads_like)
            return outs[0] if len(outs) == 1 else outs

        n_out = len(self.outputs)
        CPP_OPS.extend(raw.default._schema.name.split("::")[1] for raw in (fwd, bwd, jvp))
        for raw, fake in ((fwd, rows_fake(fwd, n_out)), (jvp, rows_fake(jvp, 2 * n_out)), (bwd, bwd_fake)):
            torch.library.register_fake(raw.default._schema.name, _same_device(raw.default._schema.name, fake))

    def _register_autograd(self, raw, out_names):
        qual = raw.default._schema.name
        arg_names = _schema_names(raw)
        primal_at = [out_names.index(o) for o in self.outputs]
        saved_tensors = [n for n in self.saved if n not in self.params or n in self.tensor_params]
        saved_params = [n for n in self.saved if n in self.params and n not in self.tensor_params]
        grad_at = {n: arg_names.index(n) for n in self.inputs}
        op_name = self.name

        def setup_context(ctx, inputs, output):
            named = dict(zip(arg_names, inputs))
            named.update(zip(out_names, output if isinstance(output, tuple) else (output,)))
            # A param may be a tensor (attention's rope tables): it is saved like the tensors,
            # which is what torch.compile's tracing of the backward expects.
            ctx.tensor_params = [n for n in saved_params if isinstance(named[n], torch.Tensor)]
            ctx.save_for_backward(*[named[n] for n in saved_tensors + ctx.tensor_params])
            ctx.params = {n: named[n] for n in saved_params if n not in ctx.tensor_params}
            ctx.n_inputs = len(inputs)
            ctx.set_materialize_grads(False)  # an unused output must not arrive as zeros and raise

        def backward(ctx, *grads):
            # Under torch.compile, AOTAutograd hands a gradient placeholder to every output of
            # the traced graph, used or not, so this check only runs in eager.
            if not torch.compiler.is_compiling():
                for k, g in enumerate(grads):
                    if k not in primal_at and g is not None:
                        raise RuntimeError(
                            f"dmf_kernels::{qual.split('::')[1]}: output {k} (a tangent or a statistic) received a "
                            f"gradient; {out_names[k]} is not differentiable (only {', '.join(self.outputs)} "
                            f"{'is' if len(self.outputs) == 1 else 'are'}). Differentiate dmf_kernels.{op_name}.")
            g = [grads[k] for k in primal_at]
            if all(x is None for x in g):
                return (None,) * ctx.n_inputs
            saved = SimpleNamespace(**dict(zip(saved_tensors + ctx.tensor_params, ctx.saved_tensors)), **ctx.params)
            result = self.backward(saved, SimpleNamespace(**dict(zip(self.outputs, g))))
            out = [None] * ctx.n_inputs
            for n, value in result.items():
                out[grad_at[n]] = value
            return tuple(out)

        torch.library.register_autograd(qual, backward, setup_context=setup_context)
        not_differentiable = [k for k in range(len(out_names)) if k not in primal_at]
        return self._function(raw, qual, setup_context, backward, not_differentiable)

    @staticmethod
    def _function(raw, qual, setup_context, backward, non_differentiable):
        """The autograd.Function the public functions call when a gradient is needed, with the
        same setup_context and backward as the raw op's registered autograd. It exists because
        torch.func's grad transforms (jacrev, torch.func.grad) cannot go through the autograd
        that register_autograd generates; here the tangents and statistics are marked
        non-differentiable, so they come back as plain tensors.

        It has no `jvp`: the public functions route dual inputs to the jvp op (and under
        torch.compile call the raw op, see _call), so a dual tensor reaching it would be a bug,
        which autograd reports instead of computing a tangent a second way."""
        def forward(*args):
            with torch._C._AutoDispatchBelowAutograd():  # skip the raw op's Python autograd kernel
                return raw(*args)

        def setup(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            ctx.mark_non_differentiable(*[output[k] for k in non_differentiable])

        return type(f"{qual.split('::')[1]}_Function", (torch.autograd.Function,), dict(
            forward=staticmethod(forward), setup_context=staticmethod(setup), backward=staticmethod(backward)))

    def _register_no_derivative(self, raw):
        qual = raw.default._schema.name

        def setup_context(ctx, inputs, output):
            ctx.n_inputs = len(inputs)
            ctx.set_materialize_grads(False)

        def backward(ctx, *grads):
            if all(g is None for g in grads) or torch.compiler.is_compiling():
                return (None,) * ctx.n_inputs
            raise RuntimeError(f"{qual} has no derivative. Differentiate dmf_kernels.{self.name} (or "
                               f"dmf_kernels.jvp.{self.name}) instead; derivatives of tangents and double "
                               "backward are not supported.")

        torch.library.register_autograd(qual, backward, setup_context=setup_context)
