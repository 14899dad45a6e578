"""The dmf package on LightningDiT blocks (issue 15): `--model LightningDMF-*` trains (flow, then DMF
from it: the MF branch's JVP through model_jvp, no fallback) and samples unchanged; the model is
the DMFT with LightningDiT's flags."""
import warnings

import numpy as np
import pytest

from dmf import DMFT_models
from dmf.__main__ import main
from dmf.convert import model_from_checkpoint
from dmf.train import TrainConfig, train


def test_lightning_family():
    for size in ("XL", "B"):
        for p in (1, 2):
            kw = DMFT_models[f"LightningDMF-{size}/{p}"].keywords
            assert kw["use_swiglu"] and kw["use_rope"] and kw["use_rmsnorm"] and kw["patch_size"] == p
    m = DMFT_models["LightningDMF-Ti/2"](input_size=8, in_channels=1, num_classes=10)
    assert m.feat_rope.freqs_cos.shape == (16, 64)
    assert {"feat_rope.freqs_cos", "blocks.0.mlp.w12.weight", "blocks.0.norm1.weight"} <= set(m.state_dict())
    with pytest.raises(ValueError, match="exclusive"):
        DMFT_models["LightningDMF-Ti/2"](input_size=8, qk_norm=True, use_qknorm=True)


def test_train_and_sample_lightning(tmp_path, capsys):
    kw = dict(model="LightningDMF-Ti/2", batch_size=8, progress=False, omega=0.3, g_max=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # model_jvp must not fall back to torch.func.jvp
        flow = train(TrainConfig(stage="flow", steps=2, out=str(tmp_path / "flow"), **kw))
        dmf = train(TrainConfig(stage="dmf", steps=2, out=str(tmp_path / "dmf"), init=str(flow), **kw))
    model, info = model_from_checkpoint(dmf)
    assert info["model_args"]["use_rope"] and type(model.blocks[0].mlp).__name__ == "SwiGLUFFN"
    out = tmp_path / "s.npz"
    main(["sample", "--ckpt", str(dmf), "--steps", "2", "--n", "4", "--out", str(out)])
    arr = np.load(out)["images"]
    assert arr.shape == (4, 1, 8, 8) and np.isfinite(arr).all()


def test_demo_takes_the_model(tmp_path, monkeypatch):
    """`dmf demo --model NAME` trains both stages with that model (the whole demo is test_dmf_demo's)."""
    import dmf.demo

    seen = []

    class Stop(Exception):
        pass

    def fake_train(cfg, resume=False):
        seen.append((cfg.stage, cfg.model))
        if len(seen) == 2:
            raise Stop
        return train(TrainConfig(**dict(vars(cfg), steps=1)))

    monkeypatch.setattr(dmf.demo, "train", fake_train)
    with pytest.raises(Stop):
        main(["demo", "--quick", "--model", "LightningDMF-Ti/2", "--out", str(tmp_path)])
    assert seen == [("flow", "LightningDMF-Ti/2"), ("dmf", "LightningDMF-Ti/2")]
