"""`emim-bench`: autotune the fused kernels, compare them with what users would use instead, show the roofline.

    cli.py        the command line (`emim-bench`, `python -m emim_triton.bench_cli`)
    cases.py      the shapes: defaults, --shape, --model (read from the model zoo)
    tune.py       the autotune command (the tuner itself is emim_triton/autotune.py)
    compare.py    the compare command: every backend on the same inputs, checked, timed
    backends.py   the competitors: fused, eager reference, torch.compile, FlexAttention
    flex.py       EMIM from FlexAttention + an unfold cost volume
    timing.py     timing (do_bench / wall clock) with rotating inputs, peak memory
    roofline.py   ceilings (measured or datasheet) and the two floors
    report.py     table, JSON, CSV;  plots.py  the PNG;  progress.py  the progress bar
    static.py     the static command: each kernel's GPU time modelled from its SASS, without a GPU
    sass.py       SASS listings: instruction classes, tensor-core FLOPs, loops by their back-edges
    trips.py      loop trip counts read from a kernel's source at a launch's arguments
    gpus.py       the GPUs the static model knows (SMs, schedulers, clock, tensor rates, bandwidth)

FLOP and byte counts come from emim_triton/cost_model.py.
"""
