"""The CPU backend: fast kernels for MLX's CPU device (elementwise math, convolutions) and
the runtime that gives MLX a fast BLAS on Linux. Models reach it through `lavit_mlx.ops`.
"""
