"""The C++ CPU kernels split their rows (forward, jvp, input gradients) and their parameter-gradient
chunks over at::parallel_for's threads. CI runs the suites with one thread per pytest-xdist process
(OMP_NUM_THREADS=1, Makefile: two processes on two cores), where every parallel_for is one call over
the whole range: this file runs every op with several threads at shapes that split, and checks the
results against one thread (bit for bit: the parameter gradients' partial sums are reduced in a
fixed chunk order, whatever the thread count) and against the float64 reference."""
import pytest
import torch

from bad_input_cases import CASES, entry, grad_outputs_for, split, tangents_for
from conftest import as_tuple, assert_f64

# 4 x 257 rows of D = 72: row_grain (csrc/cpu/cpu_common.h, 16384 / D = 227 rows) splits them in 5;
# the parameter gradients' 32-row chunks (kChunkRows) in 33.
B, N, D = 4, 257, 72


def _run(case, name, inputs, threads):
    primals, tables = split(case, inputs)
    tangents, grads = tangents_for(primals), grad_outputs_for(as_tuple(case.ref(*inputs)))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = entry(case, name)(case.fn, primals, tables, tangents, grads)
    finally:
        torch.set_num_threads(before)
    return ours, entry(case, name)(case.ref, primals, tables, tangents, grads)


@pytest.mark.parametrize("name", ["forward", "backward", "explicit_jvp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_threads_split_rows_and_chunks_the_same_way(case, name):
    inputs = case.build(B, N, D, "cpu", torch.float64)
    one, ref = _run(case, name, inputs, 1)
    many, _ = _run(case, name, inputs, 4)
    assert len(one) == len(many) == len(ref)
    for i, (a, b, r) in enumerate(zip(one, many, ref)):
        assert torch.equal(a, b), f"{case.name} {name} output {i}: 4 threads differ from 1 by {(a - b).abs().max():.3g}"
        assert_f64(b, r, f"{case.name} {name} output {i}")
