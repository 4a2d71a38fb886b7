"""The EMIM model zoo (installed as ``emim_triton.models``). Models use only the public op and module."""
