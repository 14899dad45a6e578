"""Decoupled MeanFlow: model, trainer and sampler built on dmf_kernels.

This package imports dmf_kernels; dmf_kernels never imports it.
"""
from .model import DMFT, DMFT_models

__all__ = ["DMFT", "DMFT_models"]
