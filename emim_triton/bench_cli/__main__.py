"""`python -m emim_triton.bench_cli ...` is `emim-bench ...`."""

from .cli import main

raise SystemExit(main())
