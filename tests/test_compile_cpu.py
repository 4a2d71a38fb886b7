"""`torch.compile(EMIM, fullgraph=True)` with Inductor on the CPU: forward and backward against eager.

The reference once gathered its windows with Tensor.unfold, whose compiled backward (a vectorised,
parallel scatter-add) wrote out of bounds and aborted the whole process (torch 2.13; see
docs/upstream/inductor_cpu_scatter_add_oob.py). An abort cannot be caught, so the compile runs in a child
process, and the child uses two threads because the faulty kernel is only generated for parallel code.
"""

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import torch
    import torch.nn as nn
    from emim_triton import EMIM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    T, H, W = 3, 4, 4
    emim = EMIM(32, 2, window=3, backend="reference")
    for p in (emim.rpb, *emim.motion_conv.parameters()):  # W2 and b2 start at zero: make every path count
        nn.init.normal_(p, std=0.2)
    x = torch.randn(1, T * H * W, 32, requires_grad=True)
    upstream = torch.randn(1, T * H * W, 32)
    leaves = [x, *emim.parameters()]

    def run(module):
        out = module(x, (T, H, W))
        return [out, *torch.autograd.grad(out, leaves, upstream)]

    compiled = run(torch.compile(emim, fullgraph=True))
    print("compiled forward and backward done", flush=True)
    for name, got, expected in zip(["out", "x", *(n for n, _ in emim.named_parameters())], compiled, run(emim)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    print("compiled matches eager")
""")


def test_inductor_compiled_emim_forward_and_backward_match_eager_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU path a user gets
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (
        f"the compiled EMIM child exited with status {done.returncode} (134 or -6: aborted, e.g. heap "
        f"corruption; -11: segfault)\nstdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}")
    assert "compiled matches eager" in done.stdout
