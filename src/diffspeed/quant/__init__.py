"""Diffusion-specific post-training quantization: low-bit linear formats on real kernels,
timestep-aware calibration, SmoothQuant channel balancing, cumulative error compensation and
mixed-precision bit assignment. Import the submodules directly (``diffspeed.quant.formats`` ...)."""
