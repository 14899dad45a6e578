"""The machine-code inspection tool's parsers and gate (benchmarks/inspect_kernels.py): a
parser that silently counted nothing would let every regression through the CI gate."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("inspect_kernels", ROOT / "benchmarks" / "inspect_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PTX = """
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	@%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
	ld.global.b16 { %rs2 }, [ %rd3 + 0 ];
	cp.async.cg.shared.global [ %r5 + 0 ], [ %rd4 + 0 ], 0x10, %r6;
	cp.async.commit_group;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};
	@%p3 st.global.v2.b32 [ %rd5 + 0 ], { %r7, %r8 };
"""

LOG = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90a'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 400 bytes cmem[0]
"""


def test_ptx_stats_counts_widths_and_ops():
    st = _tool()._ptx_stats(PTX)
    assert st["ld"] == {128: 1, 16: 2}
    assert st["st"] == {64: 1}
    assert (st["cp_async"], st["wgmma"], st["mma"]) == (1, 1, 1)


def test_ptxas_log_parsed_per_entry():
    res = _tool()._parse_ptxas_log(LOG)
    assert res["_Z3fooPf"] == dict(regs=255, spill_st=12, spill_ld=16, smem=256)
    assert res["_Z3barPf"] == dict(regs=64, spill_st=0, spill_ld=0, smem=0)


def test_gate_reports_the_broken_row():
    ik = _tool()
    good = dict(kernel="attn_jvp", dtype="bfloat16", D=72, layout="contig", cfg="64x32 w4 s2", regs=200,
                spill_st=0, spill_ld=0, smem=1, ld={128: 10}, st={128: 10}, cp_async=24, wgmma=27, mma=0, bytes=1)
    assert [why for why, row in ik.gate([good], [], "sm_90a") if "attn_jvp" in row] == []
    scalar = dict(good, ld={16: 160}, cp_async=0, spill_st=8)
    reasons = {why for why, row in ik.gate([scalar], [], "sm_90a") if "attn_jvp" in row}
    assert reasons == {"spills", "no vectorised global loads", "no cp.async (loads not pipelined)"}
    gelu = dict(good, kernel="gelu_tanh_jvp", cp_async=0, wgmma=0)  # elementwise: only loads and spills
    assert [why for why, row in ik.gate([gelu], [], "sm_90a") if "gelu" in row] == []
    assert [why for why, row in ik.gate([dict(gelu, ld={64: 8})], [], "sm_90a") if "gelu" in row] == \
        ["no 16-byte global loads"]


def test_row_launch_mirror_matches_the_issue_shapes():
    ik = _tool()
    assert ik.row_launch(1152, 8) == (False, 8, 160, 1)  # bf16 D=1152: 144 vectors, one per thread
    assert ik.row_launch(72, 8) == (True, 8, 32, 4)
    assert ik.row_launch(16384, 8) == (False, 32, 512, 1)
