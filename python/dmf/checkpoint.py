"""Checkpoints: ours (read, write atomically, build the model) and foreign flow models.

    python -m dmf convert SRC DST [--model NAME] [--dmf-depth K]

A flow model (SiT/REPA, facebookresearch/DiT, hustvl/LightningDiT, or our stage 1) becomes a DMF
model by loading its weights unchanged: only the decoder blocks' conditioning switches from t to r. Our checkpoint
format is a dict of tensors and plain Python values, so it loads with weights_only=True:
    {"model", "ema": state dicts, "opt", "step", "config": the TrainConfig as a dict,
     "model_args": DMFT keyword arguments, "stage": "flow" | "dmf" | "converted", "data_kind"}
"""
import os
import pickle
import re
from pathlib import Path

import torch

from .errors import DMFError

FORMAT = "dmf-1"


def read(path) -> dict:
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint of `dmf train --fsdp`: consolidated here
        from .sharding import read_sharded
        return read_sharded(path)
    if not path.is_file():
        raise DMFError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # e.g. an argparse.Namespace inside: we never unpickle code
        raise DMFError(f"{path}: holds Python objects other than tensors and plain values (a foreign checkpoint; "
                       "we load with weights_only=True)") from None
    except Exception as e:  # truncated file, not a zip/pickle at all
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise DMFError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {msg})") from None
    if not isinstance(obj, dict):
        raise DMFError(f"{path}: not a checkpoint (a {type(obj).__name__}, expected a dict)")
    return obj


def save_atomic(obj: dict, path):
    """Write to a temp file in the same directory, fsync, rename: a kill at any moment leaves
    either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_model(model_args: dict):
    from .model import DMFT

    try:
        return DMFT(**model_args)
    except (TypeError, ValueError) as e:
        raise DMFError(f"cannot build the model: {e}") from None


def model_from_checkpoint(path, ema=True, device="cpu"):
    """(DMFT in eval mode with the checkpoint's EMA (or raw) weights, checkpoint metadata)."""
    ck = read(path)
    if ck.get("format") != FORMAT or "model_args" not in ck:
        raise DMFError(f"{path}: not a dmf checkpoint (convert a flow model first: python -m dmf convert SRC DST)")
    model = build_model(ck["model_args"])
    sd = ck["ema"] if ema and ck.get("ema") is not None else ck["model"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise DMFError(f"{path}: weights do not fit the model ({str(e).splitlines()[0][:160]})") from None
    info = {k: v for k, v in ck.items() if k not in ("model", "ema", "opt")}
    return model.to(device).eval(), info


# ---------------------------------------------------------------------------------------------
# conversion

def _state_dict_of(ck: dict, ema: bool):
    """The flow model's weights inside a checkpoint: EMA by default (what one samples with)."""
    for key in (("ema", "model") if ema else ("model", "ema")) + ("state_dict",):
        if isinstance(ck.get(key), dict) and ck[key]:
            sd = ck[key]
            break
    else:
        sd = ck  # a bare state dict (facebookresearch/DiT's released files)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DMFError("no state dict of tensors found (looked at 'ema', 'model', 'state_dict' and the top level)")
    # DDP ("module.") and torch.compile ("_orig_mod.") prefixes
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}


def infer_model_args(sd: dict, model_name=None, dmf_depth=None, num_heads=None) -> dict:
    """DMFT keyword arguments from weight shapes; the head count (invisible in the weights unless
    qk-norm is on) from --num-heads, --model or the known sizes."""
    from .model import DMFT_models

    need = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight",
            "final_layer.linear.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise DMFError(f"not a DiT/SiT/DMF flow model: missing {', '.join(missing)}")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    n = sd["pos_embed"].shape[1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise DMFError(f"pos_embed has {n} tokens, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    args = dict(input_size=side * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden if "blocks.0.mlp.fc1.weight" in sd else 4.0,
                num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, use_cfg_embedding=True,
                qk_norm="blocks.0.attn.q_norm.scale" in sd, use_logvar=True)
    args.update(_lightning_flags(sd, hidden))
    if model_name is not None:
        if model_name not in DMFT_models:
            raise DMFError(f"unknown model {model_name!r}; known: {', '.join(DMFT_models)}")
        spec = DMFT_models[model_name].keywords
        for k in ("depth", "hidden_size", "patch_size"):
            if spec[k] != args[k]:
                raise DMFError(f"{model_name} has {k} {spec[k]} but the checkpoint has {args[k]}")
        args["num_heads"] = spec["num_heads"]
    elif num_heads is not None:
        if num_heads < 1 or hidden % num_heads:
            raise DMFError(f"--num-heads {num_heads} does not divide the width {hidden}")
        args["num_heads"] = num_heads
    elif args["qk_norm"] or args.get("use_qknorm"):
        q_norm = "blocks.0.attn.q_norm." + ("scale" if args["qk_norm"] else "weight")
        args["num_heads"] = hidden // sd[q_norm].shape[0]
    elif args.get("use_rope"):  # the rotary tables are (N, head_dim)
        args["num_heads"] = hidden // sd["feat_rope.freqs_cos"].shape[1]
    else:
        match = [f.keywords["num_heads"] for f in DMFT_models.values()
                 if (f.keywords["depth"], f.keywords["hidden_size"]) == (depth, hidden)]
        if not match:
            raise DMFError(f"cannot tell the number of heads of a depth-{depth}, width-{hidden} model: pass --model or --num-heads")
        args["num_heads"] = match[0]
    # the encoder/decoder split: about 2/3 of the blocks see t (XL/2: 20 of 28 in the paper)
    args["dmf_depth"] = dmf_depth if dmf_depth is not None else round(2 * depth / 3)
    if not 0 <= args["dmf_depth"] <= depth:
        raise DMFError(f"--dmf-depth must be in [0, depth] = [0, {depth}], got {args['dmf_depth']}")
    return args


def _lightning_flags(sd: dict, hidden: int) -> dict:
    """hustvl/LightningDiT's flags, read off its state dict (all False for DiT/SiT/DMF weights)."""
    flags = {}
    if "blocks.0.mlp.w12.weight" in sd:  # SwiGLUFFN(D, int(2/3 * mlp_ratio * D))
        h = sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        ratio = next((r for r in (4.0, 1.5 * h / hidden) if int(2 / 3 * r * hidden) == h), None)
        if ratio is None:
            raise DMFError(f"SwiGLU hidden width {h} is not int(2/3 * mlp_ratio * {hidden}) for any mlp_ratio")
        flags.update(use_swiglu=True, mlp_ratio=ratio)
    if "feat_rope.freqs_cos" in sd:
        flags["use_rope"] = True
    if "blocks.0.norm1.weight" in sd:
        flags["use_rmsnorm"] = True
    if "blocks.0.attn.q_norm.weight" in sd:
        flags["use_qknorm"] = True
    ada = sd.get("blocks.0.adaLN_modulation.1.weight")
    if ada is not None and ada.shape[0] == 4 * hidden:
        flags["wo_shift"] = True
    return flags


def convert(src, dst, model_name=None, dmf_depth=None, ema=True, num_heads=None, log=print) -> dict:
    ck = read(src)
    ours = ck.get("format") == FORMAT
    try:
        sd = _state_dict_of(ck, ema)
    except DMFError as e:
        raise DMFError(f"{src}: {e}") from None
    if ours:
        args = dict(ck["model_args"], use_logvar=True)
        if dmf_depth is not None:
            if not 0 <= dmf_depth <= args["depth"]:
                raise DMFError(f"--dmf-depth must be in [0, depth] = [0, {args['depth']}], got {dmf_depth}")
            args["dmf_depth"] = dmf_depth
    else:
        try:
            args = infer_model_args(sd, model_name, dmf_depth, num_heads)
        except DMFError as e:
            raise DMFError(f"{src}: {e}") from None
    model = build_model(args)
    target = model.state_dict()

    # DiT's learn_sigma head predicts 2C channels (output, then variance), laid out (p, p, 2C) per
    # token: keep the first C. A DiT is a DDPM noise predictor, so it still needs flow fine-tuning.
    w = sd.get("final_layer.linear.weight")
    pp, C = args["patch_size"] ** 2, args["in_channels"]
    if w is not None and w.shape[0] == 2 * pp * C:
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            sd[k] = sd[k].reshape(pp, 2 * C, *sd[k].shape[1:])[:, :C].reshape(pp * C, *sd[k].shape[1:])
        log("learn_sigma head (2C output channels): kept the first C; note facebookresearch/DiT predicts noise, "
            "not velocity: fine-tune it with `dmf train --stage flow --init` before DMF training")

    unexpected = sorted(k for k in sd if k not in target)
    missing = sorted(k for k in target if k not in sd)
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(target[k].shape)}" for k in sd
           if k in target and sd[k].shape != target[k].shape]
    if bad:
        raise DMFError(f"shape mismatch, refusing to convert: {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1
                                                                            else ""))
    if unexpected:
        log(f"unexpected keys (dropped): {_summary(unexpected)}")
    if missing:
        log(f"missing keys (kept at their initialisation; logvar_linear starts at zero): {_summary(missing)}")
    target.update({k: v.to(target[k].dtype) for k, v in sd.items() if k in target})
    model.load_state_dict(target, strict=True)
    out = {"format": FORMAT, "model": model.state_dict(), "ema": model.state_dict(), "step": 0, "stage": "converted",
           "model_args": args, "data_kind": ck.get("data_kind", "raw"), "config": ck.get("config"),
           "source": str(src)}
    save_atomic(out, dst)
    log(f"wrote {dst}: DMFT depth {args['depth']} (encoder {args['dmf_depth']}), width {args['hidden_size']}, "
        f"{len(sd) - len(unexpected)} tensors loaded")
    return {"missing": missing, "unexpected": unexpected, "model_args": args}


def _summary(keys):
    """Group keys by their first component so projectors.0..2.* prints as one entry."""
    groups = {}
    for k in keys:
        groups.setdefault(k.split(".")[0], []).append(k)
    return ", ".join(f"{g}.* ({len(v)})" if len(v) > 1 else v[0] for g, v in groups.items())


def main(args):
    convert(args.src, args.dst, args.model, args.dmf_depth, ema=not args.no_ema, num_heads=args.num_heads)
