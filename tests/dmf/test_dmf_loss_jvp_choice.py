"""mf_branch picks model_jvp's None tangent for r by identity, also through functools.partial
(issue 14: it compared __name__, which a partial does not have, and silently fell back to a
zeros tangent and its work)."""
import functools

import torch

import dmf_kernels as dk
from dmf import DMFT
from dmf.loss import mf_branch


def test_mf_branch_passes_none_for_r_through_a_partial_model_jvp():
    model = DMFT(input_size=8, patch_size=2, in_channels=2, hidden_size=48, num_heads=3, num_classes=10,
                 use_logvar=True, depth=2, dmf_depth=1).double()
    seen = []
    blk = model.blocks[1]  # the decoder block: conditioned on r
    orig = blk.modulation_jvp
    blk.modulation_jvp = lambda c, c_dot, dtype: seen.append(c_dot is None) or orig(c, c_dot, dtype)
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.9, 0.6], dtype=torch.float64).view(2, 1, 1, 1)  # dmf.loss's (B, 1, 1, 1) times
    r = torch.tensor([0.2, 0.1], dtype=torch.float64).view(2, 1, 1, 1)
    y = torch.tensor([1, 3])
    # skip_zero_tangents=False: a zeros tangent would be computed, only a None one is skipped
    jvp = functools.partial(dk.model_jvp, skip_zero_tangents=False)
    per_sample, _, _ = mf_branch(model, x, t, r, y, v, jvp)
    assert seen == [True]
    seen.clear()
    ref, _, _ = mf_branch(model, x, t, r, y, v, torch.func.jvp)
    torch.testing.assert_close(per_sample, ref, rtol=1e-9, atol=1e-9)
