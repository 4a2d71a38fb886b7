"""Compile a Triton kernel ahead of time for an NVIDIA GPU, on a machine without one.

`compile_for_gpu` runs Triton's real compiler pipeline (Triton IR -> TritonGPU IR -> LLVM IR -> PTX ->
cubin via ptxas) for a chosen compute capability and returns what the compiled kernel needs: shared
memory, registers, spills, the size of the PTX and, on request, the cubin. The CPU interpreter
(TRITON_INTERPRET=1) never runs that pipeline, so this is how GPU-only failures -- a `tl.dot` block
smaller than 16, too much shared memory for a config, ptxas errors -- are caught in CI without a GPU:

    info = compile_for_gpu(my_kernel, args={"x_ptr": x, "n": 1024}, constexprs={"BLOCK": 128}, arch=90)
    assert info.shared_bytes <= 227 * 1024

Nothing is launched, so the example `args` can be CPU or meta tensors: only their dtypes are used.
`compile_jobs` compiles many kernels in one go (errors returned in place), and
``python -m emim_triton.aot --jobs IN.json --output OUT.json`` does the same from the command line.

The compiler needs Triton as ``@triton.jit`` makes it without the interpreter. Where Triton was imported
with TRITON_INTERPRET=1 (the test suite on a machine without a GPU), ``@triton.jit`` made interpreter
functions instead -- of the kernels and of Triton's own standard library -- which the compiler cannot
follow. There the compile runs in a child process started without TRITON_INTERPRET: it imports the
kernel by module and name (so the kernel must be defined at module level), compiles, and answers in
JSON. Starting a child costs about a second of imports, so compile many kernels with one
`compile_jobs` call rather than many `compile_for_gpu` calls.

The kernel is specialised the way `kernel[grid](...)` specialises it at launch: tensors become pointer
arguments with 16-byte alignment hints, integers divisible by 16 get a divisibility hint, and an
integer equal to 1 (typically a unit stride) becomes a compile-time constant. Parameters listed in
the kernel's ``do_not_specialize`` / ``do_not_specialize_on_alignment`` get no hints.

Uses only Triton's compile API (``triton.compile``, ``ASTSource``, ``GPUTarget``, ``knobs``), present
from Triton 3.4 on; tested with 3.9. Needs the nvidia backend that ships in the Triton wheel (with
ptxas), see `aot_supported`. Each compile bypasses Triton's on-disk cache
so that ptxas runs and its statistics (registers, spills) are always there.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

__all__ = ["AOTCompileError", "CompileJob", "CompiledKernelInfo", "aot_supported", "compile_for_gpu",
           "compile_jobs", "kernel_function", "triton_compiles_here"]

INTERPRET_ENV = "TRITON_INTERPRET"


@dataclass(frozen=True)
class CompiledKernelInfo:
    """What one compiled kernel needs on the GPU."""

    name: str  # kernel name in the cubin
    arch: int  # compute capability compiled for, e.g. 90 (sm_90a) or 80 (sm_80)
    num_warps: int
    num_stages: int
    shared_bytes: int  # shared memory per program that Triton requests at launch (metadata.shared)
    registers: int | None  # registers per thread (ptxas), None if its log could not be read
    spills: int | None  # bytes of register spill stores per thread (ptxas), None if its log could not be read
    ptx_chars: int  # size of the PTX text
    cubin: bytes = field(default=b"", repr=False, compare=False)  # only when asked for (keep_cubin)

    def to_json(self) -> dict:
        fields = {k: v for k, v in vars(self).items() if k != "cubin"}
        return {**fields, "cubin": base64.b64encode(self.cubin).decode("ascii")}

    @classmethod
    def from_json(cls, data: dict) -> "CompiledKernelInfo":
        return cls(**{**data, "cubin": base64.b64decode(data.get("cubin", ""))})


class AOTCompileError(RuntimeError):
    """The kernel does not compile for the GPU target. In-process the Triton error is the ``__cause__``;
    from a child process its text is in the message."""


@dataclass
class CompileJob:
    """One kernel to compile: the arguments of `compile_for_gpu`, as a value that can cross processes."""

    kernel: Any
    args: dict[str, Any]
    constexprs: dict[str, Any]
    arch: int = 90
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def of_launch(cls, launch, arch: int) -> "CompileJob":
        """The job for a `emim_triton.triton_backend.KernelLaunch` (kernel, args, constexprs, options)."""
        return cls(launch.kernel, launch.args, launch.constexprs, arch, launch.num_warps, launch.num_stages)

    def to_json(self) -> dict:
        _, fn = _python_function(self.kernel)
        if "<locals>" in fn.__qualname__:
            raise ValueError(f"{fn.__name__} is defined inside a function, so another process cannot import it; "
                             f"define it at module level, or compile in a process without {INTERPRET_ENV}")
        return dict(kernel={"module": fn.__module__, "qualname": fn.__qualname__, "file": inspect.getsourcefile(fn)},
                    args={name: _encode_arg(name, value) for name, value in self.args.items()},
                    constexprs={name: _check_json(name, value) for name, value in self.constexprs.items()},
                    arch=self.arch, num_warps=self.num_warps, num_stages=self.num_stages)

    @classmethod
    def from_json(cls, data: dict) -> "CompileJob":
        args = {name: _decode_arg(value) for name, value in data["args"].items()}
        return cls(_load_kernel(data["kernel"]), args, data["constexprs"], data["arch"], data["num_warps"],
                   data["num_stages"])


def aot_supported(arch: int = 90) -> tuple[bool, str]:
    """Whether `compile_for_gpu` can work here for `arch`: (True, what will be used) or (False, why not).

    Meant for ``pytest.skip(reason)``: it checks the Triton API this module relies on and that the
    ptxas Triton uses for `arch` runs. It does not need (or look for) a GPU.
    """
    try:
        from triton import knobs  # noqa: F401  (triton >= 3.4)
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as e:
        return False, f"triton {triton.__version__} lacks the compiler API used here ({e})"
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        return False, f"triton {triton.__version__}: ASTSource(constexprs=...) is missing (needs triton >= 3.3)"
    if "nvidia" not in triton.backends.backends:
        return False, f"triton {triton.__version__} has no nvidia backend"
    try:
        tool = _ptxas(arch)
    except Exception as e:  # RuntimeError("Cannot find ptxas") and friends
        return False, f"no usable ptxas for sm_{arch}: {e}"
    return True, f"triton {triton.__version__}, ptxas {tool.version} ({tool.path})"


def compile_for_gpu(kernel, args: dict[str, Any], constexprs: dict[str, Any], *, arch: int = 90,
                    num_warps: int = 4, num_stages: int = 2, keep_cubin: bool = False) -> CompiledKernelInfo:
    """Compile `kernel` for NVIDIA compute capability `arch` without a GPU and report its needs.

    Args:
        kernel: a ``@triton.jit`` kernel (``triton.autotune`` / ``triton.heuristics`` wrappers are
            unwrapped). Under TRITON_INTERPRET=1 it must be defined at module level (see the module notes).
        args: every non-constexpr parameter (unless it has a default) -> an example value: a
            ``torch.Tensor`` (a pointer to its dtype, e.g. ``*bf16``), an ``int`` (``i32``, or ``i64``
            when it does not fit) or a ``float`` (``fp32``), as at a launch.
        constexprs: every ``tl.constexpr`` parameter (unless it has a default) -> its value.
        arch: compute capability, e.g. 80 for A100, 90 for H100/H200.
        num_warps, num_stages: the launch options of the config being checked.
        keep_cubin: also return the cubin (``info.cubin``), e.g. to disassemble it.

    Raises:
        ValueError: `args` / `constexprs` do not match the kernel's parameters.
        AOTCompileError: the compiler rejected the kernel (front end, MLIR passes or ptxas).
    """
    job = CompileJob(kernel, args, constexprs, arch, num_warps, num_stages)
    if not triton_compiles_here():
        result = compile_jobs([job], keep_cubin=keep_cubin)[0]
        if isinstance(result, Exception):
            raise result
        return result
    return _compile_here(job, keep_cubin)


def compile_jobs(jobs: list[CompileJob], *, keep_cubin: bool = False, workers: int = 1,
                 timeout: float | None = None) -> list[CompiledKernelInfo | AOTCompileError]:
    """Compile every job; returns, in the jobs' order, each one's `CompiledKernelInfo` or the
    `AOTCompileError` compiling it raised (one kernel that does not compile does not hide the others).

    Compiles in this process when Triton here can compile, else in `workers` child processes without
    TRITON_INTERPRET (each gets an equal share of the jobs; `timeout` in seconds applies to each child).

    Raises:
        ValueError, TypeError: a job's arguments do not match its kernel (checked before compiling any).
        RuntimeError: a child process itself failed (crashed or timed out), as opposed to a compile error.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    for job in jobs:
        _specialize(_validation_function(job.kernel), job.args, job.constexprs)
    if triton_compiles_here():
        results = []
        for job in jobs:
            try:
                results.append(_compile_here(job, keep_cubin))
            except AOTCompileError as e:
                results.append(e)
        return results
    payloads = [job.to_json() for job in jobs]
    shares = [list(range(i, len(jobs), workers)) for i in range(min(workers, len(jobs)))]
    answers = _run_children([[payloads[i] for i in share] for share in shares], keep_cubin, timeout)
    results: list = [None] * len(jobs)
    for share, answer in zip(shares, answers):
        for i, item in zip(share, answer):
            results[i] = CompiledKernelInfo.from_json(item) if "error" not in item else AOTCompileError(item["error"])
    return results


def triton_compiles_here() -> bool:
    """Whether Triton in this process can compile: ``@triton.jit`` made ``JITFunction``s, which it does
    unless TRITON_INTERPRET=1 was set when Triton was imported. Checked on Triton's own standard library,
    which the kernels call."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    probe = getattr(tl.standard, "cdiv", None)
    if probe is None:  # a Triton without it: fall back to the setting itself
        return not triton.knobs.runtime.interpret
    return isinstance(probe, JITFunction)


# --- compiling in this process -------------------------------------------------------------------------


def _compile_here(job: CompileJob, keep_cubin: bool) -> CompiledKernelInfo:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn, _ = _python_function(job.kernel)
    if not isinstance(fn, JITFunction):
        raise TypeError(f"expected a @triton.jit kernel made without the interpreter, got {type(fn).__name__}")
    signature, constants, attrs = _specialize(fn, job.args, job.constexprs)
    options = {
        "num_warps": job.num_warps,
        "num_stages": job.num_stages,
        # The default the JIT uses. Passing it explicitly keeps triton 3.9 from warning that
        # TRITON_DEFAULT_FP_FUSION is unset.
        "enable_fp_fusion": knobs.language.default_fp_fusion,
    }
    ptxas_log = io.StringIO()
    try:
        # The knob scopes restore the knobs (and the environment variables behind them) afterwards.
        with knobs.runtime.scope(), knobs.compilation.scope(), knobs.nvidia.scope():
            knobs.runtime.interpret = False  # tl.constexpr_function results stay constexpr
            knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
            knobs.nvidia.dump_ptxas_log = True  # Triton prints the `ptxas -v` log to stdout
            with contextlib.redirect_stdout(ptxas_log):
                compiled = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                                          target=GPUTarget("cuda", job.arch, 32), options=options)
    except Exception as e:
        raise AOTCompileError(f"{fn.__name__} does not compile for sm_{job.arch} (num_warps={job.num_warps}, "
                              f"num_stages={job.num_stages}, constexprs={job.constexprs}):\n{e}") from e

    registers, spills = _parse_ptxas_log(ptxas_log.getvalue(), compiled.metadata.name)
    return CompiledKernelInfo(
        name=compiled.metadata.name,
        arch=job.arch,
        num_warps=job.num_warps,
        num_stages=job.num_stages,
        shared_bytes=compiled.metadata.shared,
        registers=registers,
        spills=spills,
        ptx_chars=len(compiled.asm["ptx"]),
        cubin=compiled.asm["cubin"] if keep_cubin else b"",
    )


def _ptxas(arch: int):
    """The ptxas (a knobs.NvidiaTool with .path and .version) that Triton itself uses for `arch`.

    Triton 3.6 and 3.9 both have ``get_ptxas(arch)`` but pick differently (3.9 uses the newer
    "ptxas-blackwell" binary from sm_90 on, since its sm_90 PTX is ISA 9.x); older versions take no
    argument.
    """
    from triton.backends.nvidia.compiler import get_ptxas

    if inspect.signature(get_ptxas).parameters:
        return get_ptxas(arch)
    return get_ptxas()


def kernel_function(kernel):
    """The Python function a ``@triton.jit`` kernel wraps (through autotune / heuristics wrappers)."""
    return _python_function(kernel)[1]


def _python_function(kernel):
    """(the @triton.jit object, the Python function it wraps), through autotune/heuristics wrappers."""
    obj = kernel
    while hasattr(obj, "fn"):
        if inspect.isfunction(obj.fn):
            return obj, obj.fn
        obj = obj.fn
    raise TypeError(f"expected a @triton.jit kernel, got {type(kernel).__name__}")


def _validation_function(kernel):
    """A ``JITFunction`` of `kernel`'s Python function, only to read its parameters (never compiled)."""
    from triton.runtime.jit import JITFunction

    obj, fn = _python_function(kernel)
    return obj if isinstance(obj, JITFunction) else JITFunction(fn, **getattr(obj, "kwargs", {}))


def _specialize(fn, args: dict, constexprs: dict):
    """(signature, constants, attrs) for ``ASTSource``, as the JIT would build them at a launch.

    Triton 3.3+ (3.6 .. 3.9 included) format: `signature` maps every parameter name, in order, to its
    type ("constexpr" for constants); `constants` maps names to values; `attrs` maps ``(index,)`` to
    ``[["tt.divisibility", 16]]``.
    """
    from triton.runtime.jit import mangle_type

    names = [p.name for p in fn.params]
    unknown = sorted(set(args) - set(names)) + sorted(set(constexprs) - set(names))
    if unknown:
        raise ValueError(f"{fn.__name__} has no parameter(s) {unknown}; its parameters are {names}")

    defaults = {name: p.default for name, p in fn.signature.parameters.items()
                if p.default is not inspect.Parameter.empty}
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            if name in args:
                raise ValueError(f"{fn.__name__}: {name} is a tl.constexpr, pass it in constexprs")
            if name not in constexprs and name not in defaults:
                raise ValueError(f"{fn.__name__}: missing constexpr {name}")
            signature[name] = "constexpr"
            constants[name] = constexprs.get(name, defaults.get(name))
            continue
        if name in constexprs:
            raise ValueError(f"{fn.__name__}: {name} is not a tl.constexpr, pass it in args")
        if name not in args and name not in defaults:
            raise ValueError(f"{fn.__name__}: missing argument {name}")
        value = args.get(name, defaults.get(name))
        specialize = not param.do_not_specialize
        aligned = specialize and not param.do_not_specialize_on_alignment
        if isinstance(value, int) and not isinstance(value, bool) and value == 1 and specialize:
            # The JIT turns an int argument equal to 1 (a unit stride) into a constant.
            signature[name] = "constexpr"
            constants[name] = 1
            continue
        signature[name] = mangle_type(value)  # "*fp16", "*bf16", "i32", "i64", "fp32", ...
        if isinstance(value, torch.Tensor):
            divisible = aligned  # every tensor is taken as 16-byte aligned, as CUDA allocations are
        else:
            divisible = isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0 and aligned
        if divisible:
            attrs[(i, )] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def _parse_ptxas_log(log: str, kernel_name: str) -> tuple[int | None, int | None]:
    """(registers, spill-store bytes) of `kernel_name` from a ``ptxas -v`` log; None where not found."""
    # ptxas info    : Compiling entry function 'k' for 'sm_90a'
    # ptxas info    : Function properties for k
    #     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    # ptxas info    : Used 40 registers, used 1 barriers
    start = log.find(f"entry function '{kernel_name}'")
    if start < 0:
        return None, None
    section = log[start:]
    next_entry = section.find("entry function", len("entry function"))
    if next_entry >= 0:
        section = section[:next_entry]
    registers = re.search(r"Used (\d+) registers", section)
    spills = re.search(r"(\d+) bytes spill stores", section)
    return (int(registers.group(1)) if registers else None, int(spills.group(1)) if spills else None)


# --- compiling in child processes ----------------------------------------------------------------------


def _encode_arg(name: str, value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}  # only the dtype reaches the compiler
    if isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"argument {name}: expected a torch.Tensor, int or float to compile in another process, "
                    f"got {type(value).__name__}")


def _decode_arg(value):
    if isinstance(value, dict):
        return torch.empty(0, dtype=getattr(torch, value["tensor"]), device="meta")
    return value


def _check_json(name: str, value):
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise TypeError(f"constexpr {name}: expected an int, float, bool, str or None to compile in another "
                        f"process, got {type(value).__name__}")
    return value


def _load_kernel(ref: dict):
    """The kernel object a `CompileJob.to_json` reference names, imported in this process."""
    if ref["module"] == "__main__":  # a script's kernel: load the script's file under another name
        spec = importlib.util.spec_from_file_location("_emim_aot_main", ref["file"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(ref["module"])
    obj = module
    for part in ref["qualname"].split("."):
        obj = getattr(obj, part)
    return obj


def _child_environment() -> dict:
    """This process's environment without TRITON_INTERPRET, and its import path, so the child imports
    the same modules (a test module's kernels, say) the same way."""
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_ENV}
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_children(shares: list[list[dict]], keep_cubin: bool, timeout: float | None) -> list[list[dict]]:
    """Run one ``python -m emim_triton.aot`` per share of the jobs, all at once; their JSON answers."""
    with tempfile.TemporaryDirectory(prefix="emim-aot-") as tmp:
        children = []
        for i, share in enumerate(shares):
            jobs_path, out_path, err_path = (os.path.join(tmp, f"{i}.{ext}") for ext in ("jobs", "out", "err"))
            with open(jobs_path, "w") as f:
                json.dump(share, f)
            command = [sys.executable, "-m", "emim_triton.aot", "--jobs", jobs_path, "--output", out_path]
            with open(err_path, "w") as err:
                process = subprocess.Popen(command + (["--cubin"] if keep_cubin else []), stdout=subprocess.DEVNULL,
                                           stderr=err, env=_child_environment())
            children.append((process, out_path, err_path))
        answers = []
        for process, out_path, err_path in children:
            try:
                status = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other, _, _ in children:
                    other.kill()
                raise RuntimeError(f"the AOT compile child process took more than {timeout} s") from None
            if status != 0:
                with open(err_path) as f:
                    stderr = f.read()[-4000:]
                raise RuntimeError(f"the AOT compile child process failed (exit status {status}):\n{stderr}")
            with open(out_path) as f:
                answers.append(json.load(f))
        return answers


def main(argv: list[str] | None = None) -> int:
    """``python -m emim_triton.aot --jobs IN.json --output OUT.json``: compile each job of IN (a JSON list
    of `CompileJob.to_json()` objects) and write, in order, each result or {"error": its text}."""
    parser = argparse.ArgumentParser(prog="python -m emim_triton.aot", description=main.__doc__)
    parser.add_argument("--jobs", required=True, help="JSON file with the list of jobs ('-': standard input)")
    parser.add_argument("--output", required=True, help="where to write the JSON results ('-': standard output)")
    parser.add_argument("--cubin", action="store_true", help="include each cubin (base64) in the results")
    args = parser.parse_args(argv)
    if not triton_compiles_here():
        parser.error(f"Triton was imported with {INTERPRET_ENV}=1 here; run without it")
    with (contextlib.nullcontext(sys.stdin) if args.jobs == "-" else open(args.jobs)) as f:
        jobs = json.load(f)
    if not isinstance(jobs, list):
        parser.error(f"--jobs: expected a JSON list of jobs, got {type(jobs).__name__}")
    results = []
    for payload in jobs:
        try:
            results.append(_compile_here(CompileJob.from_json(payload), args.cubin).to_json())
        except (AOTCompileError, ValueError, TypeError) as e:
            results.append({"error": f"{type(e).__name__}: {e}"})
    text = json.dumps(results)
    if args.output == "-":
        print(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
