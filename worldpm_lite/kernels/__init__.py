"""Triton kernels, each beside a pure-torch `*_ref` with the same signature.

Imports only torch and triton (bottom layer: nothing of worldpm_lite).
"""
