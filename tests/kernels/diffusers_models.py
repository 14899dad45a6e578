"""Real diffusers transformers at tiny configs, built offline with random non-zero weights, each
with a call `fn(x, t)` of the two inputs a MeanFlow / sCM trainer differentiates (the noisy
latent and the time); the other inputs (text states, masks, ids) are fixed. Used by
test_patch_diffusers.py and benchmarks/bench_diffusers.py."""
import torch
import torch.nn as nn


def randomize(model, seed=0, std=0.2):
    """Random non-zero weights (diffusers zero-initialises adaLN and output projections, which
    would hide most of a block from the comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return model


def _randn(*shape, dtype):
    """Drawn in float64 and rounded: a float32 build's inputs are its float64 build's, rounded."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _out(o):
    return o[0] if isinstance(o, tuple) else o.sample


def dit(dtype=torch.float64, B=2):
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    y = torch.tensor([1, 7] * (B // 2))[:B]
    x = _randn(B, 4, 8, 8, dtype=dtype)
    # [:, :4]: the prediction; the other 4 channels are the learned variance, unused by MeanFlow
    return m, lambda model, x, t: _out(model(x, timestep=t, class_labels=y, return_dict=False))[:, :4], x


def pixart(dtype=torch.float64, B=2, mask="padded"):
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, cross_attention_dim=16, caption_channels=12, sample_size=8,
                                 patch_size=2, use_additional_conditions=False)
    ctx = _randn(B, 5, 12, dtype=dtype)
    # "padded": a padded caption batch, sample 0 has 3 of its 5 tokens, sample 1 all 5; "full": no padding
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] * (B // 2), dtype=dtype)[:B]
    keep = {"padded": keep, "full": torch.ones_like(keep), None: None}[mask]
    x = _randn(B, 4, 8, 8, dtype=dtype)
    cond = {"resolution": None, "aspect_ratio": None}
    return m, lambda model, x, t: _out(model(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs=cond,
                                             encoder_attention_mask=keep, return_dict=False))[:, :4], x


def sd3(dtype=torch.float64, B=2, qk_norm=None):
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                              pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8, qk_norm=qk_norm,
                              dual_attention_layers=(0,) if qk_norm else ())
    ctx, pooled = _randn(B, 5, 12, dtype=dtype), _randn(B, 10, dtype=dtype)
    x = _randn(B, 4, 8, 8, dtype=dtype)
    return m, lambda model, x, t: _out(model(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                                             return_dict=False)), x


def flux(dtype=torch.float64, B=2, heads=2, head_dim=16, layers=(1, 1), hw=(4, 4), text=5, channels=8):
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=channels, num_layers=layers[0],
                               num_single_layers=layers[1], attention_head_dim=head_dim, num_attention_heads=heads,
                               joint_attention_dim=12, pooled_projection_dim=10,
                               axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2))
    h, w = hw
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3).to(dtype)
    txt_ids = torch.zeros(text, 3, dtype=dtype)
    ctx, pooled = _randn(B, text, 12, dtype=dtype), _randn(B, 10, dtype=dtype)
    x = _randn(B, h * w, channels, dtype=dtype)
    return m, lambda model, x, t: _out(model(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                                             img_ids=img_ids, txt_ids=txt_ids, return_dict=False)), x


def wan(dtype=torch.float64, B=2, heads=2, head_dim=16, layers=2, fhw=(2, 4, 4), text=5, ffn=32):
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                              in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=ffn,
                              num_layers=layers, rope_max_seq_len=32)
    ctx = _randn(B, text, 12, dtype=dtype)
    x = _randn(B, 4, *fhw, dtype=dtype)
    return m, lambda model, x, t: _out(model(x, timestep=t, encoder_hidden_states=ctx, return_dict=False)), x


def qwen_image(dtype=torch.float64, B=2):
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                                    axes_dims_rope=(4, 6, 6))
    ctx = _randn(B, 5, 12, dtype=dtype)
    ctx_mask = torch.ones(B, 5, dtype=torch.long)
    x = _randn(B, 16, 16, dtype=dtype)  # (B, (H/2)(W/2), 4 C) packed latents of a 8 x 8, 4-channel image
    shapes = [(1, 4, 4)] * B
    return m, lambda model, x, t: _out(model(x, encoder_hidden_states=ctx, encoder_hidden_states_mask=ctx_mask,
                                             timestep=t, img_shapes=shapes, return_dict=False)), x


def gqa_model_class():
    """A tiny diffusers ModelMixin: timestep-conditioned, two layers of diffusers' own grouped-query
    attention (ACE-Step's AceStepAttention: 4 query heads over 2 key/value heads, RMSNorm
    qk-norms, dispatch_attention_fn with enable_gqa), a SwiGLU and a GELU-tanh FeedForward. ACE-Step's whole model needs
    sliding-window masks; this keeps its attention. Built on first use (no diffusers import here)."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.attention import FeedForward
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero
    from diffusers.models.transformers.ace_step_transformer import AceStepAttention

    class TinyGQAModel(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, dim=32, heads=4, kv_heads=2, head_dim=8, layers=2, channels=4):
            super().__init__()
            self.proj_in = nn.Linear(channels, dim)
            self.time_proj = Timesteps(16, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embed = TimestepEmbedding(16, dim)
            self.norms = nn.ModuleList(AdaLayerNormZero(dim) for _ in range(layers))
            self.attns = nn.ModuleList(AceStepAttention(dim, heads, kv_heads, head_dim, bias=True)
                                       for _ in range(layers))
            self.ffs = nn.ModuleList(FeedForward(dim, mult=2, activation_fn="gelu-approximate" if i % 2 else "swiglu")
                                     for i in range(layers))
            self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
            self.proj_out = nn.Linear(dim, channels)

        def forward(self, x, t):
            temb = self.time_embed(self.time_proj(t).to(x.dtype))
            h = self.proj_in(x)
            for norm, attn, ff in zip(self.norms, self.attns, self.ffs):
                n, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm(h, emb=temb)
                h = h + gate_msa[:, None] * attn(n)
                h = h + gate_mlp[:, None] * ff(torch.nn.functional.layer_norm(h, h.shape[-1:]) *
                                               (1 + scale_mlp[:, None]) + shift_mlp[:, None])
            return self.proj_out(self.norm_out(h, temb))

    return TinyGQAModel


def gqa(dtype=torch.float64, B=2):
    m = gqa_model_class()()
    x = _randn(B, 7, 4, dtype=dtype)
    return m, lambda model, x, t: model(x, t), x


MODELS = {"dit": dit, "pixart": pixart, "pixart_full_mask": lambda **kw: pixart(mask="full", **kw), "sd3": sd3,
          "sd3_qk_rms": lambda **kw: sd3(qk_norm="rms_norm", **kw),
          "flux": flux, "wan": wan, "qwen_image": qwen_image, "gqa": gqa}


def build(name, dtype=torch.float64, seed=0, **kw):
    """(model, call, x, t): the model with random weights in `dtype`, eval mode; call(model, x, t)."""
    torch.manual_seed(seed)
    model, call, x = MODELS[name](dtype=dtype, **kw)
    model = randomize(model.to(dtype), seed).eval()
    t = torch.tensor([0.3, 0.8], dtype=dtype).repeat(x.shape[0])[:x.shape[0]]
    return model, call, x, t
