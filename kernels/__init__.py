"""Triton JIT kernels of the fused EMIM op (installed as ``emim_triton.kernels``).

Only kernels and their launch-configuration data live here; launching, autograd and the custom op
are in ``emim_triton.ops``.
"""
