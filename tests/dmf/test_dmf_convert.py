"""dmf convert: flow checkpoints (SiT/REPA-style with projectors, facebookresearch/DiT with
learn_sigma, our stage 1) become DMF checkpoints whose model reproduces the flow model at r = t;
unexpected keys are reported and dropped, shape mismatches refused."""
import pytest
import torch

from conftest import randomize_params

from dmf import DMFT
from dmf.convert import convert, model_from_checkpoint, read, save_atomic
from dmf.errors import DMFError
from replicas import dit as rdit
from replicas import official_dmf as rdmf

GEOM = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=48, num_heads=3, num_classes=10)



def inputs(B=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 2, 8, 8, generator=g, dtype=torch.float64), torch.rand(B, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (B,), generator=g))


def test_sit_repa_checkpoint(tmp_path):
    """A SiT/REPA-style flow model (the official DMFT at r = t, without logvar) with projector
    weights in a {"model", "ema", "opt", "args"} checkpoint."""
    flow = randomize_params(rdmf.DMFT(**GEOM, depth=3, dmf_depth=3)).eval()
    sd = dict(flow.state_dict(), **{"projectors.0.0.weight": torch.zeros(4, 48), "projectors.0.0.bias": torch.zeros(4)})
    torch.save({"model": {f"module.{k}": torch.zeros_like(v) for k, v in sd.items()}, "ema": sd, "steps": 10},
               tmp_path / "sit.pt")
    logs = []
    rep = convert(tmp_path / "sit.pt", tmp_path / "dmf.pt", model_name=None, dmf_depth=2, num_heads=3, log=logs.append)
    assert rep["unexpected"] == ["projectors.0.0.bias", "projectors.0.0.weight"]
    assert rep["missing"] == ["logvar_linear.bias", "logvar_linear.weight"]
    assert any("projectors" in line for line in logs)
    model, info = model_from_checkpoint(tmp_path / "dmf.pt")
    assert info["stage"] == "converted" and model.dmf_depth == 2 and model.use_logvar
    x, t, y = inputs()
    model, flow = model.double(), flow.double()
    with torch.no_grad():
        u, lv = model(x, t, t, y, return_logvar=True)
        torch.testing.assert_close(u, flow(x, t, t, y), rtol=1e-10, atol=1e-10)  # EMA weights, unchanged
        assert (lv == 0).all()
        assert not torch.allclose(model(x, t, t * 0.5, y), u)  # the decoder now listens to r


def test_dit_learn_sigma(tmp_path):
    """A bare facebookresearch/DiT state dict: 2C output channels, keep the first C."""
    dit = randomize_params(rdit.DiT(**{k: v for k, v in GEOM.items()}, depth=2, learn_sigma=True)).eval().double()
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    logs = []
    convert(tmp_path / "dit.pt", tmp_path / "dmf.pt", num_heads=3, log=logs.append)
    assert any("learn_sigma" in line for line in logs)
    model, _ = model_from_checkpoint(tmp_path / "dmf.pt")
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.double()(x, t, t, y), dit(x, t, y)[:, :2], rtol=1e-10, atol=1e-10)


def test_our_stage1_round_trip(tmp_path):
    flow = randomize_params(DMFT(**GEOM, depth=2, dmf_depth=1))
    ema = randomize_params(DMFT(**GEOM, depth=2, dmf_depth=1), seed=5)
    args = dict(GEOM, depth=2, dmf_depth=1, mlp_ratio=4.0, use_logvar=False, qk_norm=False)
    save_atomic({"format": "dmf-1", "model": flow.state_dict(), "ema": ema.state_dict(), "model_args": args,
                 "stage": "flow", "data_kind": "unit", "config": {"stage": "flow"}, "step": 3}, tmp_path / "f.pt")
    rep = convert(tmp_path / "f.pt", tmp_path / "d.pt", log=lambda *_: None)
    assert rep["unexpected"] == [] and rep["model_args"]["dmf_depth"] == 1
    ck = read(tmp_path / "d.pt")
    for k, v in ema.state_dict().items():  # EMA weights by default, bit for bit
        assert torch.equal(ck["ema"][k], v) and torch.equal(ck["model"][k], v)
    assert ck["data_kind"] == "unit"
    convert(tmp_path / "f.pt", tmp_path / "raw.pt", ema=False, log=lambda *_: None)
    assert torch.equal(read(tmp_path / "raw.pt")["model"]["blocks.0.attn.qkv.weight"],
                       flow.state_dict()["blocks.0.attn.qkv.weight"])
    # converting a converted checkpoint again changes nothing
    convert(tmp_path / "d.pt", tmp_path / "d2.pt", log=lambda *_: None)
    ck2 = read(tmp_path / "d2.pt")
    assert all(torch.equal(ck2["model"][k], v) for k, v in ck["model"].items())


def test_refusals(tmp_path):
    flow = rdmf.DMFT(**GEOM, depth=3, dmf_depth=3)
    sd = flow.state_dict()
    bad = dict(sd, **{"blocks.1.mlp.fc1.weight": torch.zeros(7, 48)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(DMFError, match="shape mismatch"):
        convert(tmp_path / "bad.pt", tmp_path / "x.pt", num_heads=3, log=lambda *_: None)
    torch.save(sd, tmp_path / "ok.pt")
    with pytest.raises(DMFError, match="depth"):
        convert(tmp_path / "ok.pt", tmp_path / "x.pt", model_name="DMFT-S/2", log=lambda *_: None)
    with pytest.raises(DMFError, match="unknown model"):
        convert(tmp_path / "ok.pt", tmp_path / "x.pt", model_name="DMFT-Q/2", log=lambda *_: None)
    with pytest.raises(DMFError, match="dmf-depth"):
        convert(tmp_path / "ok.pt", tmp_path / "x.pt", dmf_depth=4, num_heads=3, log=lambda *_: None)
    with pytest.raises(DMFError, match="num-heads"):
        convert(tmp_path / "ok.pt", tmp_path / "x.pt", log=lambda *_: None)
    torch.save({"weights": {"a": "b"}}, tmp_path / "foreign.pt")
    with pytest.raises(DMFError, match="no state dict"):
        convert(tmp_path / "foreign.pt", tmp_path / "x.pt", log=lambda *_: None)
    torch.save({"a": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(DMFError, match="not a DiT"):
        convert(tmp_path / "foreign.pt", tmp_path / "x.pt", log=lambda *_: None)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("flags", [
    dict(use_swiglu=True, use_rope=True, use_rmsnorm=True),                       # LightningDiT's released config
    dict(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=True),
    dict(use_qknorm=True),                                                         # LayerNorm qk-norm, GELU MLP
], ids=["released", "all", "layernorm-qknorm"])
def test_lightningdit_checkpoint(tmp_path, flags):
    """hustvl/LightningDiT's {"ema", "model", "opt"} checkpoint: its flags read off the weights, its
    EMA weights loaded unchanged (rotary tables included); at r = t the DMF model is the flow model."""
    from replicas import lightningdit as rl

    with torch.compiler.set_stance("force_eager"):
        flow = rl.LightningDiT(input_size=8, patch_size=2, in_channels=2, hidden_size=128, depth=3, num_heads=2,
                               num_classes=10, **flags)
        flow = randomize_params(flow).eval()
        sd = flow.state_dict()
        torch.save({"ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}}, tmp_path / "ldit.pt")
        rep = convert(tmp_path / "ldit.pt", tmp_path / "dmf.pt", dmf_depth=2, log=lambda *a: None)
        assert rep["unexpected"] == [] and rep["missing"] == ["logvar_linear.bias", "logvar_linear.weight"]
        assert {k: rep["model_args"].get(k, False) for k in flags} == flags and rep["model_args"]["num_heads"] == 2
        model, _ = model_from_checkpoint(tmp_path / "dmf.pt")
        x, t, y = inputs()
        x, t = x.float(), t.float()
        with torch.no_grad():
            torch.testing.assert_close(model(x, t, t, y), flow(x, t, y), rtol=2e-5, atol=2e-5)
            assert not torch.allclose(model(x, t, t * 0.5, y), flow(x, t, y))
