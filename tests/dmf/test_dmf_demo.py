"""python -m dmf demo --quick: every stage end to end (flow training, conversion, DMF training,
classifier, sampling at 1/2/4 and 50 steps, the results table and grids), in under 2 minutes."""
import json
import math

import pytest

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
    assert "Plan: --quick" in (tmp_path / "results.md").read_text()
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
    """The plan is sized from the measured step times: the full plan where it fits the budget, fewer
    DMF steps (never below the 600 that met the quality targets) where it does not, and an honest
    over-budget note where even those do not fit; bf16 only where it is fast."""
    from dmf.demo import FULL, MIN_DMF_STEPS, TRAIN_BUDGET_S, amp_for, plan_from_warmup

    assert amp_for(True, False) == "bf16" and amp_for(False, True) == "bf16" and amp_for(False, False) == "off"
    fast = plan_from_warmup(0.12, 0.29, "bf16")           # this VM with native bf16
    assert fast["dmf_steps"] == FULL["dmf_steps"] == 1400 and fast["flow_steps"] == 700
    assert fast["predicted_train_s"] <= TRAIN_BUDGET_S and "full plan" in fast["why"]
    mid = plan_from_warmup(0.2, 0.5, "off")
    assert mid["dmf_steps"] == (TRAIN_BUDGET_S - 700 * 0.2) // 0.5 and mid["amp"] == "off"
    assert abs(mid["predicted_train_s"] - TRAIN_BUDGET_S) < 0.5 and "fill the budget" in mid["why"]
    avx2 = plan_from_warmup(0.33, 0.94, "off")            # the AVX2-only CPU of issue 16: 15 min before
    assert avx2["dmf_steps"] == MIN_DMF_STEPS and "over budget" in avx2["why"]
    assert avx2["predicted_train_s"] == pytest.approx(795) and f"{795 / 60:.1f} min" in avx2["why"]
    assert plan_from_warmup(0.01, 0.01, "bf16")["dmf_steps"] == 1400    # never beyond the measured plan


def test_warmup_measures_both_stages(tmp_path, monkeypatch):
    import dmf.demo as demo

    monkeypatch.setitem(demo.FULL, "batch", 8)
    monkeypatch.setattr(demo, "WARMUP_STEPS", dict(flow=2, dmf=2))
    flow_s, dmf_s = demo.warmup(tmp_path, "off", 0, "teacher")
    # both measured (no order between them: a timing comparison flakes on a loaded machine)
    assert 0 < flow_s < 60 and 0 < dmf_s < 60
    assert not (tmp_path / "warmup").exists()
