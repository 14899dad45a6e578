"""The machine-code inspection tool's parsers and gate (benchmarks/inspect_kernels.py): a
parser that silently counted nothing would let every regression through the CI gate."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    assert ik.row_launch(1152, 8) == (0, 8, 160, 1)  # bf16 D=1152: 144 vectors, one per thread of a block
    assert ik.row_launch(72, 8) == (16, 8, 16, 8)  # bf16 D=72: 9 vectors, 16-lane teams, 2 rows per warp
    assert ik.row_launch(64, 8) == (8, 8, 8, 16)
    assert ik.row_launch(72, 4) == (32, 8, 32, 4)  # fp32 D=72: 18 vectors, a warp
    assert ik.row_launch(16384, 8) == (0, 32, 512, 1)


ROW_LAUNCH_PROBE = r"""
#include <cstdio>
#include "cuda_common.cuh"
int main() {
  const long dims[] = {1, 7, 8, 9, 16, 17, 64, 72, 80, 128, 129, 256, 384, 512, 513, 1024, 1152, 4099, 8192, 16384};
  const int vecs[] = {1, 2, 4, 8};
  for (long d : dims)
    for (int v : vecs) {
      const dmf::cuda::RowLaunch L = dmf::cuda::row_launch(d, v);
      std::printf("%ld %d %d %d %d %d\n", d, v, L.team, L.ept, L.threads, L.rows_per_block);
    }
}
"""


def test_row_launch_mirror_equals_the_cuda_host_code(tmp_path):
    """The Python mirror against row_launch() itself, compiled by nvcc as host code (no GPU
    needed): the gate's hot rows are only right while the two agree."""
    import shutil
    import subprocess

    import pytest

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        pytest.skip("nvcc not installed (CI has it: make ci-extra compiles every .cu)")
    src = tmp_path / "probe.cu"
    src.write_text(ROW_LAUNCH_PROBE)
    exe = tmp_path / "probe"
    r = subprocess.run([nvcc, "-std=c++17", "-I", str(ROOT / "csrc" / "cuda"), str(src), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ik = _tool()
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    rows = [tuple(int(x) for x in line.split()) for line in lines if line.strip()]
    assert len(rows) == 80
    for d, v, *cpp in rows:
        assert tuple(cpp) == ik.row_launch(d, v), (d, v)

def test_triton_launches_load_standalone_and_include_rope_rows():
    # The launcher and kernel files load without the dmf_kernels package (a stand-in package
    # for their relative imports), fresh per call (the recorders patch the launcher module).
    ik = _tool()
    rows = ik.triton_launches(90)
    again = ik.triton_launches(80)
    assert len(rows) == len(again)
    kernels = {r["kernel"] for r in rows}
    assert {"attn_fwd+rope", "attn_jvp+rope", "attn_bwd_dkdv+rope", "attn_bwd_dq+rope"} <= kernels
    for r in rows:
        if r["kernel"].startswith("attn_") and r["kernel"] != "attn_bwd_preprocess":
            assert r["kwargs"]["ROPE"] == r["kernel"].endswith("+rope"), r["kernel"]
            assert type(r["fn"]).__name__ == "JITFunction"
