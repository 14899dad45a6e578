"""benchmarks/bench_dmf_train.py runs end to end on a tiny shape (CI never runs the full suite)."""
import torch

from benchmarks import bench_dmf_train, harness


def test_dmf_train_suite_builds_and_runs(monkeypatch):
    monkeypatch.setattr(bench_dmf_train, "shapes", lambda device, quick: [("DMFT-Ti/4", "digits N4", 8, 1, 10, 2)])
    cases = list(bench_dmf_train.cases("cpu", torch.float32, True))
    assert {(c.mode, c.provider) for c in cases} == {(m, p) for m in bench_dmf_train.MODES for p in ("dmf", "eager")}
    # the official way's first torch.func.jvp calls are slow: time it on the DMF step only
    cases = [c for c in cases if c.provider == "dmf" or c.mode == "dmf step"]
    rows = harness.run_cases(cases, "cpu", quick=True, log=lambda *_: None, smoke=True)
    assert not [r for r in rows if r.get("ms") is None], [r.get("error") for r in rows]
    mf = [r for r in rows if r["provider"] == "dmf" and r["mode"] == "jvp+bwd"]
    assert mf[0]["jvp_over_fwd"] is not None
    table = bench_dmf_train.summary(rows)
    assert "Ti/4" in table and table.splitlines()[-1].count("|") == 7
    assert table.splitlines()[-1].split("|")[-2].strip()  # official DMF step / ours was computed


def test_dmf_train_suite_bf16_autocast_on_cpu(monkeypatch):
    """--amp bf16 on the CPU: the steps run under CPU autocast (the dtype column says bf16)."""
    monkeypatch.setattr(bench_dmf_train, "shapes", lambda device, quick: [("DMFT-Ti/4", "digits N4", 8, 1, 10, 2)])
    cases = [c for c in bench_dmf_train.cases("cpu", torch.bfloat16, True) if c.provider == "dmf"]
    rows = harness.run_cases(cases, "cpu", quick=True, log=lambda *_: None, smoke=True)
    assert not [r for r in rows if r.get("ms") is None], [r.get("error") for r in rows]
    assert {r["dtype"] for r in rows} == {"bfloat16"}
