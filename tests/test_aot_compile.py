"""Every shipped kernel configuration compiles for real GPUs (sm_80, sm_90), checked without a GPU.

The interpreter accepts code a GPU compiler rejects (a tl.dot under 16 wide, too much shared memory,
ptxas failures), so this is CI's only look at the real compile. The launches compiled are the ones the
op makes (`example_launches`, built on meta tensors), with the heuristic configurations it ships;
shared memory, registers and spills of each land in the session summary (tests/conftest.py).

Under TRITON_INTERPRET=1 (set by conftest without a GPU) `compile_jobs` compiles in child processes
started without it (`python -m emim_triton.aot`), all the launches in one batch, shared by the tests.
"""


import pytest
import torch

from emim_triton.checks import EMIMShape
from emim_triton.launch_configs import default_configs
from emim_triton.triton_backend import DEFAULT_VARIANT, Variant, example_launches
from helpers import AOT_REPORT, SHARED_MEMORY_LIMIT, compile_params


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (case id, shape, dtypes, archs): the UniFormer stage-3/4 shapes in every dtype on both targets, then
# the ends of the supported range (K 3..15, D 16..128 incl. non-powers of two, tiny frames).
CASES = [
    ("uniformer-stage3", EMIMShape(32, 16, 14, 14, 5, 64, 7), ("fp32", "fp16", "bf16"), (80, 90)),
    ("uniformer-stage4", EMIMShape(32, 16, 7, 7, 8, 64, 7), ("bf16",), (80, 90)),
    ("generation-64x64", EMIMShape(2, 16, 64, 64, 8, 64, 7), ("bf16",), (90,)),
    ("K3-D16-tiny-frame", EMIMShape(1, 1, 2, 3, 1, 16, 3), ("fp32",), (80,)),
    ("K5-D24", EMIMShape(2, 8, 14, 14, 4, 24, 5), ("bf16",), (90,)),
    ("K9-D48", EMIMShape(2, 8, 14, 14, 4, 48, 9), ("bf16",), (90,)),
    ("K15-D128", EMIMShape(2, 8, 16, 16, 2, 128, 15), ("bf16",), (80, 90)),
]
# The op's variants compile to other kernels (key-frame offset -1, dilation != 1, a context-channel limit below
# D): (case id, shape, dtypes, archs, variant). The weights kernel takes no variant, so it is not repeated.
VARIANT_CASES = [
    ("prev-dilation2-authors32-stage3", EMIMShape(32, 16, 14, 14, 5, 64, 7), ("bf16",), (80, 90),
     Variant("prev", 2, 32)),
    ("next-dilation3-K5-D24", EMIMShape(2, 8, 14, 14, 4, 24, 5), ("fp32",), (90,), Variant("next", 3)),
]


def _params():
    seen = set()
    for case, shape, dtypes, archs, variant in [(*c, DEFAULT_VARIANT) for c in CASES] + VARIANT_CASES:
        for dtype_name in dtypes:
            configs = default_configs(shape.height, shape.width, shape.window, shape.head_dim, DTYPES[dtype_name])
            launches = example_launches(shape, DTYPES[dtype_name], configs, variant=variant)
            for kernel_name, launch in launches.items():
                if variant != DEFAULT_VARIANT and kernel_name == "backward_weights":
                    continue
                for arch in archs:
                    key = (kernel_name, dtype_name, arch, tuple(sorted(launch.constexprs.items())),
                           launch.num_warps, launch.num_stages, variant)
                    if key not in seen:  # shapes that share a configuration compile it once
                        seen.add(key)
                        yield pytest.param(launch, arch, id=f"{case}-{dtype_name}-{kernel_name}-sm{arch}")


PARAMS = list(_params())


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Test id -> its CompiledKernelInfo, or the AOTCompileError compiling it raised."""
    return compile_params(PARAMS, lambda param: param.values)


@pytest.mark.parametrize("launch, arch", PARAMS)
def test_kernel_compiles_for_gpu(compiled, request, launch, arch):
    info = compiled[request.node.callspec.id]
    if isinstance(info, Exception):
        raise info
    AOT_REPORT.append((info, launch.constexprs))
    assert info.ptx_chars > 0
    assert isinstance(info.registers, int) and 0 < info.registers <= 255, "ptxas's register count was not read"
    assert isinstance(info.spills, int) and info.spills >= 0, "ptxas's spill count was not read"
    assert info.shared_bytes <= SHARED_MEMORY_LIMIT[arch], f"{info.name} needs {info.shared_bytes} B of shared memory"
