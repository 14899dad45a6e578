"""The kernel inspection tool's parsing and gate (the compile itself runs in `make inspect`,
with triton 3.6 in its own environment)."""
from benchmarks import inspect_kernels as ik

PTXAS = """ptxas info    : Compiling entry function '_attn_jvp_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_jvp_kernel
    16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, 1024 bytes smem
"""

PTX = """
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.b16 %rs1, [%rd2];
	@%p2 ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
	cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
	st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
"""


def test_parsers():
    assert ik.parse_ptxas(PTXAS) == {"_attn_jvp_kernel": dict(regs=255, spill=32, smem=1024)}
    c = ik.ptx_counts(PTX)
    assert (c["ld_v4"], c["ld_v2"], c["ld_scalar"], c["ld_b16"], c["cp_async"], c["tc"], c["st"]) == (1, 1, 1, 1, 1, 1, 1)


def test_gate():
    row = dict(source="triton", kernel="attn_jvp", hot=True, spill=0, ld_v4=10, ld_v2=0, ld_b16=0, cp_async=24, tc=27,
               loops=True)
    assert ik.gate(row, "90a") is None
    assert "scalar 16-bit" in ik.gate(dict(row, ld_b16=160), "90a")
    assert "cp.async" in ik.gate(dict(row, cp_async=0), "90a")
    assert "spills 8" in ik.gate(dict(row, spill=8), "90a")
    assert ik.gate(dict(row, spill=8, hot=False), "90a") is None
    assert ik.gate(dict(row, kernel="attn_bwd_dkdv", spill=80), "80") is None  # known, documented
