"""The benchmark harness runs end to end on tiny shapes (CI never runs the full suite, so
this keeps it from rotting): cases from every suite build, time, and write results."""
import json

import torch

from benchmarks import bench_adaln, bench_attention, bench_dit, bench_gated_residual, bench_lightningdit, bench_rms_norm
from benchmarks import harness


def test_every_suite_builds_and_runs_a_case(monkeypatch):
    tiny = {
        bench_adaln: [(1, 3, 24)],
        bench_gated_residual: [(1, 3, 24)],
        bench_rms_norm: [(1, 2, 3, 16)],
        bench_attention: [(1, 2, 8, 16)],
    }
    for suite, shapes in tiny.items():
        monkeypatch.setattr(suite, "shapes", lambda device, quick, headline=False, s=shapes: s)
        cases = [c for c in suite.cases("cpu", torch.float32, True) if c.provider in ("dmf", "eager")]
        assert {c.mode for c in cases} == {"fwd", "bwd", "fwd+jvp"}
        rows = harness.run_cases(cases, "cpu", quick=True, log=lambda *_: None, smoke=True)
        failed = [r for r in rows if r.get("ms") is None]
        assert not failed, failed
        ours = [r for r in rows if r["provider"] == "dmf"]
        assert all(r["vs_eager"] is not None and r["bytes_moved"] > 0 for r in ours)


def test_dit_suite_builds_and_runs(monkeypatch):
    monkeypatch.setattr(bench_dit, "shapes", lambda device, quick: [("DMFT-Ti/2", "block", 1), ("DMFT-Ti/2", "model", 1)])
    cases = [c for c in bench_dit.cases("cpu", torch.float32, True) if c.provider in ("dmf", "eager")]
    assert {c.mode for c in cases} == {"fwd", "fwd+bwd", "fwd+jvp", "jvp+bwd"}
    rows = harness.run_cases(cases, "cpu", quick=True, log=lambda *_: None, smoke=True)
    assert not [r for r in rows if r.get("ms") is None]
    steps = [r for r in rows if r["provider"] == "dmf" and r["mode"] in ("fwd+jvp", "jvp+bwd")]
    assert len(steps) == 4 and all(r["jvp_over_fwd"] is not None and r["vs_eager"] is not None for r in steps)


def test_lightningdit_suite_builds_and_runs(monkeypatch):
    tiny = lambda **kw: bench_lightningdit.rl.LightningDiT(depth=1, hidden_size=64, patch_size=1, num_heads=1, **kw)  # noqa
    monkeypatch.setitem(bench_lightningdit.SIZES, "tiny", tiny)
    monkeypatch.setattr(bench_lightningdit, "shapes", lambda device, quick: [("tiny", "model", 1)])
    cases = [c for c in bench_lightningdit.cases("cpu", torch.float32, True) if c.provider in ("dmf", "eager")]
    rows = harness.run_cases(cases, "cpu", quick=True, log=lambda *_: None, smoke=True)
    assert not [r for r in rows if r.get("ms") is None]
    steps = [r for r in rows if r["provider"] == "dmf" and r["mode"] in ("fwd+jvp", "jvp+bwd")]
    assert len(steps) == 2 and all(r["vs_eager"] is not None for r in steps)


def test_results_files(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    rows = [dict(op="adaln_modulate", mode="fwd", provider=p, shape="B1 N3 D24", dtype="float32", ms=ms,
                 reps=5, iqr_ms=[ms, ms], peak_mb=0.1, gbps=1.0, tflops=None, bytes_moved=10, flops=0)
            for p, ms in (("dmf", 1.0), ("eager", 2.0))]
    harness.add_ratios(rows)
    assert rows[0]["vs_eager"] == 2.0
    paths = harness.write_results(rows, "cpu", stem="unit")
    meta = json.loads(paths[0].read_text())["meta"]
    assert meta["device"] == "cpu" and "build_info" in meta
    assert "| adaln_modulate | fwd |" in paths[1].read_text()


def test_swiglu_rope_suites_build_and_run(monkeypatch):
    # swiglu, rope (same check as test_every_suite_builds_and_runs_a_case)
    from benchmarks import bench_rope, bench_swiglu

    for suite, shapes in {bench_swiglu: [(1, 3, 24)], bench_rope: [(1, 2, 3, 16)]}.items():
        monkeypatch.setattr(suite, "shapes", lambda device, quick, s=shapes: s)
        cases = [c for c in suite.cases("cpu", torch.float32, True) if c.provider in ("dmf", "eager")]
        assert {c.mode for c in cases} == {"fwd", "bwd", "fwd+jvp"}
        rows = harness.run_cases(cases, "cpu", quick=True, log=lambda *_: None, smoke=True)
        assert not [r for r in rows if r.get("ms") is None]
        assert all(r["vs_eager"] is not None and r["bytes_moved"] > 0 for r in rows if r["provider"] == "dmf")


def test_attention_rope_rows_build_and_run(monkeypatch):
    monkeypatch.setattr(bench_attention, "shapes", lambda device, quick: [(1, 2, 8, 16)])
    cases = [c for c in bench_attention.cases("cpu", torch.float32, True) if c.provider in ("dmf_rope", "eager_rope")]
    assert {(c.mode, c.provider) for c in cases} == {(m, p) for m in ("fwd", "bwd", "fwd+jvp")
                                                     for p in ("dmf_rope", "eager_rope")}
    rows = harness.run_cases(cases, "cpu", quick=True, log=lambda *_: None, smoke=True)
    assert not [r for r in rows if r.get("ms") is None]
