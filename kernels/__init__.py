"""Triton kernels and their launchers (installed as `qlora_fast.kernels`).

This package imports torch and triton only, never the rest of qlora_fast.
"""
