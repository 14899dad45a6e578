"""python -m dmf demo --quick: every stage end to end (flow training, conversion, DMF training,
classifier, sampling at 1/2/4 and 50 steps, the results table and grids), in under 2 minutes."""
import json
import math

from dmf.__main__ import main


def test_quick_demo(tmp_path, capsys):
    main(["demo", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["steps"]) for r in res["rows"]] == [("DMF", 1), ("DMF", 2), ("DMF", 4), ("flow", 50)]
    for r in res["rows"]:
        assert math.isfinite(r["fd"]) and r["fd"] > 0 and 0 <= r["acc"] <= 1 and r["ms_per_sample"] > 0
        assert (tmp_path / r["grid"]).stat().st_size > 100
    assert res["rows"][-1]["fd_vs_flow50"] == 1.0
    assert res["plan"]["mf_velocity"] == "teacher" and res["plan"]["amp"] == "off" and res["device"] == "cpu"
    assert "MF velocity: teacher" in (tmp_path / "results.md").read_text()
    assert res["step_s"]["flow"] > 0 and res["step_s"]["dmf"] > 0  # measured, never compared: speed is benchmarked
    md = (tmp_path / "results.md").read_text()
    assert md.count("\n| DMF |") == 3 and md in out
    for stage in ("flow", "dmf"):
        assert (tmp_path / stage / "checkpoints" / "last.pt").is_file()
        assert (tmp_path / stage / "loss.png").is_file()
    assert (tmp_path / "flow" / "dmf_init.pt").is_file()
    assert list(tmp_path.glob("digits_classifier_seed0.pt"))


def test_plan_choice():
    """bf16 plan where bf16 is fast (GPU, CPU with native bf16), fp32 plan elsewhere, quick for tests."""
    from dmf.demo import FULL, FULL_FP32, QUICK, plan_for

    assert plan_for(True, True, True) is QUICK
    assert plan_for(False, True, False) is FULL and plan_for(False, False, True) is FULL
    assert plan_for(False, False, False) is FULL_FP32
    assert FULL["amp"] == "bf16" and FULL_FP32["amp"] == "off" and FULL_FP32["flow_steps"] == FULL["flow_steps"]
