"""Package data: measured launch configurations shipped for known GPUs (``tuned_configs.json``).

The file is written by ``emim-bench autotune --write-defaults`` on the GPU it describes; see
``emim_triton.tuning_cache`` for its format. No GPU has been measured yet, so it lists no device.
"""
