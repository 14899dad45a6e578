"""python -m dmf {prepare, train, sample, evaluate, convert, demo} ...: see `python -m dmf COMMAND --help`.

Bad input (unknown model, corrupt checkpoint, data of the wrong shape, impossible config) ends
with one line on stderr and exit code 2, before any training starts.
"""
import argparse
import sys

from .errors import DMFError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        print(f"dmf {self.prog.split()[-1]}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _train_args(p):
    from .train import AMP_MODES, MF_VELOCITIES, TrainConfig

    d = TrainConfig()
    p.add_argument("--stage", choices=["flow", "dmf"], required=True)
    p.add_argument("--model", default=d.model, help="a DMFT_models name (default: DMFT-Ti/2 on digits, else DMFT-S/2)")
    p.add_argument("--data", default=d.data,
                   help="digits (default), a .pt/.npz file with images/latents and labels, or a latent folder "
                        "from `dmf prepare` (memory-mapped)")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps of the run")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--init", default=d.init, help="start from this dmf checkpoint's weights")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt up to --steps")
    p.add_argument("--dmf-depth", type=int, default=d.dmf_depth, help="encoder blocks (conditioned on t)")
    p.add_argument("--no-logvar", dest="use_logvar", action="store_false", help="stage dmf without the logvar head")
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--beta2", type=float, default=d.beta2)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false")
    p.add_argument("--lr-decay", type=float, default=d.lr_decay,
                   help="decay lr linearly to 0 over this last fraction of the steps (default 0: constant)")
    for name in ("P_mean", "P_std", "P_mean_t", "P_std_t", "P_mean_r", "P_std_r"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=getattr(d, name))
    p.add_argument("--cfg-prob", type=float, default=d.cfg_prob, help="label dropout")
    p.add_argument("--omega", type=float, default=d.omega, help="model guidance strength (0: off)")
    p.add_argument("--g-min", type=float, default=d.g_min)
    p.add_argument("--g-max", type=float, default=d.g_max)
    p.add_argument("--mf-velocity", choices=MF_VELOCITIES, default=d.mf_velocity,
                   help="the MF branch's velocity: data (official: noise - x) or teacher "
                        "(the frozen --init flow model's u(x_t, t, t))")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--device", default=d.device)
    p.add_argument("--amp", choices=AMP_MODES, default=d.amp,
                   help="bf16 autocast: auto = on CUDA only; bf16 also on the CPU (fast on CPUs with AVX512-BF16/AMX)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 instead of DDP (parameters, gradients, AdamW state and EMA sharded over the ranks); "
                        "checkpoints are OUT/checkpoints/sharded-stepN directories (torch.distributed.checkpoint)")
    p.add_argument("--act-ckpt", action="store_true",
                   help="activation checkpointing: each block's activations are recomputed in the backward "
                        "(less memory, more compute; the jvp's tangent is still computed once)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="data loader processes (-1: none for in-memory data, up to 4 for a latent folder)")


def parser():
    from .train import MF_VELOCITIES

    ap = _Parser(prog="dmf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_args(sub.add_parser("train", help="train a flow model (stage flow) or a DMF model (stage dmf)"))

    p = sub.add_parser("sample", help="sample from a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, required=True, help="sampling steps (DMF: 1, 2, 4, ...; flow: e.g. 50)")
    p.add_argument("--num-samples", "--n", dest="n", type=int, required=True,
                   help="samples in all (torchrun needs the long name: it reads --n as its own option)")
    p.add_argument("--class", dest="cls", type=int, default=None, help="one class for all samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=1.0, help="time shift s: t' = s t / (1 + (s - 1) t)")
    p.add_argument("--sampler", choices=("euler", "restart"), default="euler",
                   help="euler: the flow-map (DMF) or flow Euler rule; restart: the official restart sampler (DMF)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--g-min", type=float, default=0.0, help="guidance only for t in [g-min, g-max]")
    p.add_argument("--g-max", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward (the unit of resuming)")
    p.add_argument("--vae", default=None, help="decode latents with this AutoencoderKL (default: the one named "
                                               "in the training data's dataset.json)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--device", default="")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True, help=".png grid; .npz (arr_0 uint8 NHWC as ADM, images float32 NCHW "
                                                "in [0, 1], labels); or a folder: FOLDER/images/*.png + "
                                                "FOLDER/samples.npz. Under torchrun each rank makes its share")

    p = sub.add_parser("prepare", help="an image folder -> a memory-mapped VAE latent folder for train --data")
    p.add_argument("src", help="ImageFolder layout (one subfolder per class), or a flat folder with --labels")
    p.add_argument("out")
    p.add_argument("--resolution", type=int, required=True, help="centre-crop size in pixels (ADM/edm2 crop)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL: a hub name (stabilityai/sd-vae-ft-ema) "
                                                "or a folder saved with save_pretrained")
    p.add_argument("--labels", default=None, help="labels of a flat folder: edm2 dataset.json, {path: label} "
                                                  "JSON, or lines 'path label'")
    p.add_argument("--batch-size", type=int, default=32, help="images per chunk (the unit of resuming)")
    p.add_argument("--no-flip", action="store_true", help="do not also encode the horizontal flips")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--threads", type=int, default=4, help="image decoding threads")
    p.add_argument("--device", default="")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("evaluate", help="FID, Inception Score, precision and recall of samples against a reference")
    p.add_argument("samples", help="a folder of images or an .npz (arr_0 uint8 NHWC, or images float NCHW)")
    p.add_argument("--ref", required=True, help="a folder, an .npz of images, or an .npz with mu and sigma")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's Inception file (weights-inception-2015-12-05-6726825d.pth) for offline "
                        "machines (default: downloaded by torch-fidelity)")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default ~/.cache/dmf/fid)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-precision-recall", dest="precision_recall", action="store_false",
                   help="skip precision/recall (a k-NN pass over samples x reference images in the 2048-d "
                        "features: ~1e12 flops at 50k x 10k)")
    p.add_argument("--prc-k", type=int, default=3, help="precision/recall neighbourhood size (ADM: 3)")
    p.add_argument("--device", default="")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("convert", help="a flow-model checkpoint (SiT/REPA, DiT, our stage 1) -> a DMF checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--model", default=None, help="DMFT_models name (needed when the size is not a known one)")
    p.add_argument("--dmf-depth", type=int, default=None, help="encoder blocks (default: the source's, or 2/3)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (for sizes not in DMFT_models)")
    p.add_argument("--no-ema", action="store_true", help="convert the raw weights instead of the EMA")

    p = sub.add_parser("demo", help="digits: flow model, conversion, DMF, then quality and speed")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a tiny run (< 2 min) that exercises every stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mf-velocity", choices=MF_VELOCITIES, default="teacher",
                   help="the DMF stage's MF velocity: teacher (default here: the stage-1 model's) or data (official)")
    p.add_argument("--model", default="", help="a DMFT_models name, e.g. LightningDMF-Ti/2 (default: DMFT-Ti/2; the "
                                                "quality targets were measured on it)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import main as run
        elif args.command == "sample":
            from .sample import main as run
        elif args.command == "prepare":
            from .prepare import main as run
        elif args.command == "evaluate":
            from .evaluate import main as run
        elif args.command == "convert":
            from .convert import main as run
        else:
            from .demo import main as run
        run(args)
    except DMFError as e:
        print(f"dmf {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"dmf {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
