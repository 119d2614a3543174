"""Fused GPU kernels. Optional: everything has an eager PyTorch path that gives the same bits."""
