"""`python -m emim_triton.bench ...` is `emim-bench ...`."""

from .cli import main

raise SystemExit(main())
