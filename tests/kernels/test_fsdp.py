"""FSDP2 (fully_shard) with 2 and 4 CPU processes (gloo): every dmf_kernels.nn module as its own
unit, dmf.DMFT in seven flag combinations and an all-decoder dmf_depth 0, with per-block units
then the root (reshard after forward on and off), the DiT, LightningDiT (two flag sets) and
official-DMF replicas and diffusers' DiT, PixArt, SD3 (qk rms_norm), Flux, Wan, Qwen-Image and a GQA
model, all patched by dmf_kernels.patch, give the unsharded model's forward, gradients, model_jvp (output, tangent,
gradients of a loss on the output) and torch.func.jvp in float64 (tests/fsdp_worker.py measures,
through full_tensor()), and a hand-written forward_ad block (inside dmf_kernels.fsdp_forward_ad)
with the input requiring grad. Also: one all-gather per unit for primal and tangent together, patch
after fully_shard refused with the order to use, bf16 mixed precision as a smoke test, and
activation checkpointing (dmf_kernels.nn.act_ckpt, before and after fully_shard; DiTBlocks and
PreNormBlocks) against the unsharded model without it, also through the trainer's DMF loss, and
torch.compile of the blocks (compiled then sharded, and sharded then compiled; aot_eager) equal to
the eager unsharded model. In the same run, every flag combination of dmf.DMFT (48) and of a
patched LightningDiT (32), with a cheaper check each (tests/fsdp_combos.py), and each unsharded
DMFT / LightningDiT's model_jvp against torch.func.jvp and central differences."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dmf_helpers import NEUTRAL_CWD, env_with_paths, failure_text

WORKER = Path(__file__).resolve().parent.parent / "fsdp_worker.py"
sys.path.insert(0, str(WORKER.parent))
import fsdp_worker  # noqa: E402  (the case names)

FOUR_RANKS = ["DMFT-lightning-reshard1", "DiTBlock-lightning", "patched-LightningDiT"]


def launch(out, nproc, cases=()):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(WORKER), str(out), *cases], env=env_with_paths(), cwd=NEUTRAL_CWD,
                          capture_output=True, text=True, timeout=600)


def run_worker(tmp_path, nproc, cases=()):
    out = tmp_path / f"fsdp_{nproc}.json"
    proc = launch(out, nproc, cases)
    assert proc.returncode == 0, failure_text(proc.stderr)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("fsdp2"), 2)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("fsdp4"), 4, FOUR_RANKS)


# errors relative to the size of what is compared; every other check is exact to 1e-12
TOLERANCES = {"bf16_relative": 0.05,
              # central differences in float64 (fsdp_combos.py): ~1e-9 of the tangent's size measured;
              # a wrong or missing tangent term is ~1e-2 or more
              "ref_model_jvp_vs_differences": 1e-6}


def check(name, res):
    assert "raised" not in res, f"{name}: {res['raised']}"
    assert res, name
    for what, e in res.items():
        tol = TOLERANCES.get(what, 1e-12)
        if what.startswith("ref_"):  # the unsharded reference against itself (fsdp_combos.py)
            assert e <= tol, f"{name}: the unsharded model's {what[4:].replace('_', ' ')}: differ by {e:.3g}"
        else:
            assert e <= tol, f"{name}: {what} differs from the unsharded model by {e:.3g}"


@pytest.mark.parametrize("name", list(fsdp_worker.CASES))
def test_two_ranks(two, name):
    if name.startswith("patched-diffusers-"):
        pytest.importorskip("diffusers", reason="diffusers is not installed (make build installs it: DMF_DEPS)")
    check(name, two[name])


@pytest.mark.parametrize("name", FOUR_RANKS)
def test_four_ranks(four, name):
    check(name, four[name])


def test_fsdp_forward_ad_bad_input_and_unsharded():
    import torch
    import torch.autograd.forward_ad as fwAD
    import dmf_kernels as dk
    with pytest.raises(TypeError, match=r"fsdp_forward_ad: modules\[1\] must be an nn.Module, got Tensor"):
        dk.fsdp_forward_ad(torch.nn.Linear(2, 2), torch.ones(1))
    lin = torch.nn.Linear(3, 2).double()   # an unsharded module: no hooks, the same numbers
    x, xd = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with fwAD.dual_level(), dk.fsdp_forward_ad(lin):
        o, o_dot = fwAD.unpack_dual(lin(fwAD.make_dual(x, xd)))
    torch.testing.assert_close(o_dot, xd @ lin.weight.T, rtol=0, atol=1e-14)


def test_a_crashed_rank_leaves_its_stack(tmp_path):
    """A rank that dies in C code leaves its threads' C++ frames and its Python stack (c10's handler
    and faulthandler in the worker), which the failure message shows first, and the case it was in
    (a rank that torchrun then ends with SIGTERM also dumps its stack, if it is still running). CI
    run 2's segfault of rank 1 left only "exitcode: -11"."""
    proc = launch(tmp_path / "out.json", 2, ["segfault-on-rank-1"])
    assert proc.returncode != 0
    msg = failure_text("W: a warning\n" * 1000 + proc.stderr, tail=500)
    assert msg.startswith("crash dumps:\nSIGSEGV(11), PID: "), msg[:3000]
    dump = msg[:msg.index("stderr's last")]
    # C++ frames (c10's handler: the crashing thread's, ctypes' here), then Python's
    assert "ffi_call" in dump and "Fatal Python error: Segmentation fault" in dump, msg
    assert "in segfault_on_rank_1" in dump, msg
    assert "fsdp_worker rank 1: case segfault-on-rank-1" in proc.stderr, proc.stderr[-3000:]
    assert "exitcode: -11" in proc.stderr, proc.stderr[-3000:]
