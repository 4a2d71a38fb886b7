"""Compile a Triton kernel ahead of time for an NVIDIA GPU, on a machine without one.

`compile_for_gpu` runs Triton's real compiler pipeline (Triton IR -> TritonGPU IR -> LLVM IR -> PTX ->
cubin via ptxas) for a chosen compute capability and returns what the compiled kernel needs: shared
memory, registers, spills and the size of the PTX. The CPU interpreter (TRITON_INTERPRET=1) never
runs that pipeline, so this is how GPU-only failures -- a `tl.dot` block smaller than 16, too much
shared memory for a config, ptxas errors -- are caught in CI without a GPU:

    info = compile_for_gpu(my_kernel, args={"x_ptr": x, "n": 1024}, constexprs={"BLOCK": 128}, arch=90)
    assert info.shared_bytes <= 227 * 1024

Nothing is launched, so the example `args` can be CPU or meta tensors: only their dtypes are used.

The kernel is specialised the way `kernel[grid](...)` specialises it at launch: tensors become pointer
arguments with 16-byte alignment hints, integers divisible by 16 get a divisibility hint, and an
integer equal to 1 (typically a unit stride) becomes a compile-time constant. Parameters listed in
the kernel's ``do_not_specialize`` / ``do_not_specialize_on_alignment`` get no hints.

Works with TRITON_INTERPRET=1 set. Then ``@triton.jit`` makes ``InterpretedFunction``s -- the kernel,
its helpers and Triton's own ``tl.cdiv``, ``tl.sum``, ... -- which the compiler cannot follow, so
while compiling each is temporarily swapped for the ``JITFunction`` it would otherwise have been.
Tested with Triton 3.6 and 3.9; needs the nvidia backend that ships in the Triton wheel (with ptxas),
see `aot_supported`. Each call compiles from scratch (Triton's on-disk cache is bypassed) so the
ptxas statistics are always there. Compiling temporarily changes process-wide state (Triton's
settings, module globals under the interpreter), so do not call it while another thread runs
Triton code.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import triton

__all__ = ["AOTCompileError", "CompiledKernelInfo", "aot_supported", "compile_for_gpu"]


@dataclass(frozen=True)
class CompiledKernelInfo:
    """What one compiled kernel needs on the GPU."""

    name: str  # kernel name in the cubin
    arch: int  # compute capability compiled for, e.g. 90 (sm_90a) or 80 (sm_80)
    num_warps: int
    num_stages: int
    shared_bytes: int  # shared memory per program that Triton requests at launch (metadata.shared)
    registers: int | None  # registers per thread (ptxas), None if unknown
    spills: int | None  # bytes of register spill stores per thread (ptxas), None if unknown
    ptx_chars: int  # size of the PTX text


class AOTCompileError(RuntimeError):
    """The kernel does not compile for the GPU target; the Triton error is the ``__cause__``."""


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
                    num_warps: int = 4, num_stages: int = 2) -> CompiledKernelInfo:
    """Compile `kernel` for NVIDIA compute capability `arch` without a GPU and report its needs.

    Args:
        kernel: a ``@triton.jit`` kernel -- a ``JITFunction``, or the ``InterpretedFunction`` that
            ``@triton.jit`` makes under TRITON_INTERPRET=1 (``triton.autotune`` / ``triton.heuristics``
            wrappers are unwrapped).
        args: every non-constexpr parameter (unless it has a default) -> an example value: a
            ``torch.Tensor`` (a pointer to its dtype, e.g. ``*bf16``), an ``int`` (``i32``, or ``i64``
            when it does not fit) or a ``float`` (``fp32``), as at a launch.
        constexprs: every ``tl.constexpr`` parameter (unless it has a default) -> its value.
        arch: compute capability, e.g. 80 for A100, 90 for H100/H200.
        num_warps, num_stages: the launch options of the config being checked.

    Raises:
        ValueError: `args` / `constexprs` do not match the kernel's parameters.
        AOTCompileError: the compiler rejected the kernel (front end, MLIR passes or ptxas).
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _as_jit_function(kernel)
    signature, constants, attrs = _specialize(fn, args, constexprs)
    options = {
        "num_warps": num_warps,
        "num_stages": num_stages,
        # The default the JIT uses. Passing it explicitly keeps triton 3.9 from warning that
        # TRITON_DEFAULT_FP_FUSION is unset.
        "enable_fp_fusion": knobs.language.default_fp_fusion,
    }
    ptxas_log = io.StringIO()
    try:
        # The knob scopes restore the knobs (and the environment variables behind them) afterwards.
        with knobs.runtime.scope(), knobs.compilation.scope(), knobs.nvidia.scope(), \
                _triton_as_compiled(fn):
            knobs.runtime.interpret = False  # tl.constexpr_function results stay constexpr
            knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
            knobs.nvidia.dump_ptxas_log = True  # Triton prints the `ptxas -v` log to stdout
            with contextlib.redirect_stdout(ptxas_log):
                compiled = triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                                          target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:
        raise AOTCompileError(f"{fn.__name__} does not compile for sm_{arch} (num_warps={num_warps}, "
                              f"num_stages={num_stages}, constexprs={constexprs}):\n{e}") from e

    registers, spills = _parse_ptxas_log(ptxas_log.getvalue(), compiled.metadata.name)
    return CompiledKernelInfo(
        name=compiled.metadata.name,
        arch=arch,
        num_warps=num_warps,
        num_stages=num_stages,
        shared_bytes=compiled.metadata.shared,
        registers=registers,
        spills=spills,
        ptx_chars=len(compiled.asm["ptx"]),
    )


# --- helpers -----------------------------------------------------------------------------------------


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


def _as_jit_function(kernel):
    """`kernel` as a ``JITFunction``, whatever ``@triton.jit`` returned."""
    from triton.runtime.jit import JITFunction

    interpreted = _interpreted_function_class()
    while not isinstance(kernel, JITFunction) and not _is(kernel, interpreted) and hasattr(kernel, "fn"):
        kernel = kernel.fn  # Autotuner / Heuristics wrappers
    if isinstance(kernel, JITFunction):
        return kernel
    if _is(kernel, interpreted):
        return _jit_twin(kernel)
    raise TypeError(f"expected a @triton.jit kernel, got {type(kernel).__name__}")


def _interpreted_function_class():
    """Triton's ``InterpretedFunction`` class, or None when the interpreter was never loaded (then none exist)."""
    module = sys.modules.get("triton.runtime.interpreter")
    return getattr(module, "InterpretedFunction", None)


def _is(value, cls) -> bool:
    # type(), not isinstance(): isinstance may read value.__class__, which some module globals turn into a
    # deprecation warning.
    return cls is not None and issubclass(type(value), cls)


_JIT_TWINS = weakref.WeakKeyDictionary()  # InterpretedFunction -> the JITFunction @triton.jit would have made


def _jit_twin(interpreted):
    from triton.runtime.jit import JITFunction

    twin = _JIT_TWINS.get(interpreted)
    if twin is None:
        # The same Python function and the keyword arguments @triton.jit was given (do_not_specialize, ...).
        twin = _JIT_TWINS[interpreted] = JITFunction(interpreted.fn, **getattr(interpreted, "kwargs", {}))
    return twin


@contextlib.contextmanager
def _triton_as_compiled(kernel):
    """Within: Triton as its compiler expects it, even when TRITON_INTERPRET=1 made it otherwise.

    Under TRITON_INTERPRET=1, ``@triton.jit`` makes ``InterpretedFunction``s -- the kernel's helpers and
    Triton's own standard library too (``tl.cdiv``, ``tl.sum``, ``tl.max``, ``x.sum()``, ...) -- and the
    code generator only follows calls into ``JITFunction``s. Each is swapped for its ``JITFunction``
    twin: in module globals (of every loaded module, covering ``helper(...)`` and ``module.helper(...)``),
    in the tensor methods Triton adds from its standard library, and in closure cells.

    Running an interpreted kernel can also leave ``triton.language.core``'s builtins (``tl.core.load``,
    ``range``, ...) replaced by the interpreter's versions: a helper the interpreter calls patches the
    modules its globals hold and never undoes it (seen in Triton 3.6 and 3.9). Those are put back too.
    Everything is restored on exit.
    """
    interpreted = _interpreted_function_class()
    if interpreted is None:  # the interpreter never ran, so there is nothing to swap
        yield
        return
    import triton.language as tl

    undo = []  # (restore, original), applied in reverse order

    def swap(namespace, name: str, value) -> None:
        """Set namespace.name (a module dict or a class) to value, remembering what was there."""
        if isinstance(namespace, dict):
            undo.append((lambda v, d=namespace, n=name: d.__setitem__(n, v), namespace[name]))
            namespace[name] = value
        else:
            undo.append((lambda v, c=namespace, n=name: setattr(c, n, v), vars(namespace)[name]))
            setattr(namespace, name, value)

    try:
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if isinstance(namespace, dict):
                for name, value in list(namespace.items()):
                    if _is(value, interpreted):
                        swap(namespace, name, _jit_twin(value))
        # Members such as tl.tensor.sum forward to the interpreted function through a wrapper closure;
        # without the interpreter the member is the JITFunction itself.
        for name, member in list(vars(tl.core.tensor).items()):
            cells = getattr(member, "__closure__", None) or ()
            target = next((c.cell_contents for c in cells if _is(c.cell_contents, interpreted)), None)
            if target is not None:
                swap(tl.core.tensor, name, _jit_twin(target))
        # Helpers captured from an enclosing function (kernels defined inside a function).
        pending, seen = [kernel], set()
        while pending:
            fn = pending.pop()
            if id(fn) in seen:
                continue
            seen.add(id(fn))
            for cell in getattr(getattr(fn, "fn", None), "__closure__", None) or ():
                contents = cell.cell_contents
                if _is(contents, interpreted):
                    pending.append(contents)
                    undo.append((lambda v, c=cell: setattr(c, "cell_contents", v), contents))
                    cell.cell_contents = _jit_twin(contents)
        # Interpreter patches left behind in the triton.language modules.
        interpreter_file = sys.modules["triton.runtime.interpreter"].__file__
        language_modules = (tl, tl.core, tl.math, tl.standard)
        for module in language_modules:
            for name, value in list(vars(module).items()):
                if _interpreter_made(value, interpreter_file):
                    original = _original_of(name, value, language_modules, interpreter_file)
                    if original is not None:
                        swap(vars(module), name, original)
        yield
    finally:
        for restore, original in reversed(undo):
            restore(original)


def _interpreter_made(value, interpreter_file: str) -> bool:
    """Whether `value` is one of the interpreter's stand-ins for a triton.language member."""
    if value is print:  # the interpreter's tl.static_print
        return True
    code = getattr(getattr(value, "func", value), "__code__", None)  # functools.partial or function
    return code is not None and code.co_filename == interpreter_file


def _original_of(name: str, stand_in, modules, interpreter_file: str):
    """The triton.language member the interpreter's `stand_in` replaced, or None if it cannot be found."""
    # The interpreter wraps each builtin in `lambda *args, member=member, **kwargs: ...`.
    member = (getattr(stand_in, "__kwdefaults__", None) or {}).get("member")
    if member is not None:
        return member
    # Others (range, static_range, multiple_of, ...): the same member of a module it was restored in.
    for module in modules:
        candidate = vars(module).get(name)
        if candidate is not None and not _interpreter_made(candidate, interpreter_file):
            return candidate
    return None


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
