"""pytest-benchmark suites of the EMIM backends (`pytest bench/ --benchmark-only`), apart from the tests.

They time CUDA kernels and are skipped without a CUDA GPU. `python -m pytest -q tests` (CI) never
collects them: pyproject's testpaths is ["tests"].
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="the EMIM benchmarks time GPU kernels and torch sees no CUDA GPU here")
    for item in items:
        item.add_marker(skip)
