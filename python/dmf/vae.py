"""The image autoencoder (diffusers' AutoencoderKL) of latent-space models: encode for `prepare`,
decode for `sample`.

Pixels enter the VAE in [-1, 1] (as DiT, SiT/REPA and the official DMF preprocessing do; edm2 itself
uses [0, 1]). Model space is z_model = (z - shift_factor) * scaling_factor with the VAE config's
factors (SD-VAE: scaling 0.18215, no shift), and back z = z_model / scaling_factor + shift_factor.
"""
import torch

from .errors import DMFError
from .optional import require


def load_vae(name_or_path: str, device="cpu"):
    """AutoencoderKL from a hub name (e.g. stabilityai/sd-vae-ft-ema, needs the network) or a local
    folder saved with save_pretrained; eval mode, no grads."""
    diffusers = require("diffusers", "VAE encoding and decoding")
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(name_or_path, low_cpu_mem_usage=False)
    except Exception as e:  # missing folder, no network, not a VAE: the library's first line says which
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DMFError(f"--vae {name_or_path}: cannot load an AutoencoderKL ({type(e).__name__}: {msg})") from None
    return vae.to(device).eval().requires_grad_(False)


def factors(vae):
    """(scaling_factor, shift_factor) of the VAE's config (shift 0 when it has none)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def downsampling(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_moments(vae, pixels: torch.Tensor):
    """uint8 (B, 3, H, W) -> (mean, std) of the posterior, each (B, C, H/f, W/f) float32."""
    x = pixels.to(vae.device, vae.dtype) / 127.5 - 1
    d = vae.encode(x).latent_dist
    return d.mean.float(), d.std.float()


@torch.no_grad()
def decode(vae, z_model: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """Model-space latents (B, C, h, w) -> float32 images (B, 3, H, W) in [0, 1]."""
    if z_model.shape[1] != vae.config.latent_channels:
        raise DMFError(f"the VAE has {vae.config.latent_channels} latent channels but the model makes "
                       f"{z_model.shape[1]}")
    z = z_model.to(vae.device, vae.dtype) / scale + shift
    return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1).cpu()
