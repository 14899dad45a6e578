"""Parity oracles for the tests: eager re-implementations with the same module structure,
parameter names and arithmetic as the codebases our users bring (facebookresearch/DiT with
timm's PatchEmbed/Attention/Mlp, and the official Decoupled MeanFlow code, kyungmnlee/dmf).
timm itself needs torchvision, which has no CPU wheel here, so its three layers are replicated
with the same attribute structure. Nothing here imports dmf_kernels."""
