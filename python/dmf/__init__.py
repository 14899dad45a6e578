"""Decoupled MeanFlow model, trainer and sampler built on dmf_kernels (to come).

This package imports dmf_kernels; dmf_kernels never imports it.
"""
