"""SASS, the GPU's own instruction set, as the static cost model reads it: instructions, their classes,
the work of tensor-core instructions, loops, and the source lines each instruction comes from.

The text is nvdisasm's (`disassemble`; nvdisasm ships with Triton's NVIDIA backend). Triton has ptxas keep
line information (``-lineinfo``) unless told not to, and ``nvdisasm -gi`` prints it before the instructions
it applies to: ``//## File "f.py", line 60``, or, for code inlined from a helper,
``//## File "common.py", line 58 inlined at "f.py", line 64``. A comment holds until the next one.

Loops are found by their back-edges: a branch to a lower address closes the loop that starts there.
That is how ptxas lays out the structured loops Triton emits (Triton has no goto); an irreducible jump
backwards would be misread as a loop.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# Classes of instructions, by mnemonic (the opcode before its first "."). Uniform-datapath instructions
# (U...) issue from the same schedulers, so they count; they are their own class.
_CLASS_OF = {}
for _cls, _names in {
    "tensor": "HMMA HGMMA IMMA IGMMA QGMMA BMMA BGMMA DMMA OMMA",
    "float": "FFMA FMUL FADD FMNMX FSETP FSET FCHK FSWZADD FRND FFMA2 FMUL2 FADD2 HFMA2 HADD2 HMUL2 HMNMX2 HSETP2 "
             "DFMA DADD DMUL DSETP",
    "mufu": "MUFU",
    "convert": "F2F F2I I2F I2FP F2FP I2I F2IP",
    "integer": "IMAD IADD3 IADD VIADD LOP3 LOP SHF SHL SHR LEA ISETP IABS IMNMX VIMNMX PRMT SGXT POPC FLO BREV BMSK "
               "IDP IMUL ISCADD PLOP3 P2R R2P VOTE",
    "select": "SEL FSEL",
    "load_global": "LDG LD LDGSTS UTMALDG UBLKCP",
    "store_global": "STG ST RED ATOM ATOMG UTMASTG",
    "shared": "LDS STS LDSM STSM ATOMS",
    "local": "LDL STL",
    "shuffle": "SHFL",
    "move": "MOV CS2R S2R S2UR LDC R2UR",
    "control": "BRA BRX JMP JMX CALL RET EXIT BAR BSSY BSYNC WARPSYNC NOP DEPBAR MEMBAR FENCE YIELD WARPGROUP "
               "ERRBAR CCTL BPT BREAK ELECT",
}.items():
    _CLASS_OF.update(dict.fromkeys(_names.split(), _cls))

CLASSES = ("tensor", "float", "mufu", "convert", "integer", "select", "load_global", "store_global", "shared",
           "local", "shuffle", "uniform", "move", "control", "other")

# Operand-type modifiers of tensor-core opcodes -> the rate they run at (gpus.GPU.tensor_flops keys).
_MMA_TYPES = {"TF32": "tf32", "BF16": "bf16", "F16": "fp16", "E4M3": "fp8", "E5M2": "fp8", "S8": "int8",
              "U8": "int8", "F64": "fp64"}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. "HMMA.1688.F32.TF32"
    operands: str
    predicate: str  # "@P2", "@!P0" or ""
    locations: tuple  # ((file, line), ...) it comes from: where it is, then the callers it was inlined into
    target: str | None = None  # label a branch jumps to

    @property
    def mnemonic(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def instruction_class(self) -> str:
        return instruction_class(self.opcode)

    def line_in(self, path: str) -> int | None:
        """The line of `path` (a source file) this instruction comes from: the outermost one, which for
        code inlined from a helper is the call in `path`. None if it has no location there."""
        wanted = os.path.realpath(path)
        lines = [line for file, line in self.locations if os.path.realpath(file) == wanted]
        return lines[-1] if lines else None


@dataclass(frozen=True)
class Loop:
    head: int  # address of the loop's first instruction: the back-edge's target
    back_edge: Instruction  # the backward branch that closes it

    def contains(self, address: int) -> bool:
        return self.head <= address <= self.back_edge.address


@dataclass(frozen=True)
class Listing:
    """The instructions of one kernel, in address order."""

    function: str
    instructions: tuple
    labels: dict  # label -> address

    def executed(self) -> tuple:
        """The instructions that can run: all but the padding after the final trap loop (``BRA`` to itself)
        that ptxas puts at the end of every kernel (never reached: every path ends in EXIT before it)."""
        instructions = list(self.instructions)
        while instructions and instructions[-1].mnemonic == "NOP":
            instructions.pop()
        if instructions and instructions[-1].mnemonic == "BRA" and \
                self.labels.get(instructions[-1].target) == instructions[-1].address:
            instructions.pop()
        return tuple(instructions)

    def loops(self) -> list[Loop]:
        """Every loop, by its back-edge, in address order of the back-edges."""
        found = []
        for ins in self.executed():
            if ins.mnemonic in ("BRA", "JMP") and ins.target is not None:
                head = self.labels.get(ins.target)
                if head is not None and head < ins.address:
                    found.append(Loop(head, ins))
        return found


def instruction_class(opcode: str) -> str:
    """The class (one of CLASSES) of an opcode such as "FFMA" or "LDG.E.128"."""
    mnemonic = opcode.split(".")[0]
    if mnemonic in _CLASS_OF:
        return _CLASS_OF[mnemonic]
    return "uniform" if mnemonic.startswith("U") else "other"


def mma_work(opcode: str) -> tuple[str, int] | None:
    """(operand type, FLOPs) of one warp's execution of a tensor-core instruction; None for other opcodes
    or a shape not understood.

    HMMA.1688.F32.TF32 is one warp's m16 n8 k8 product: 2*16*8*8 FLOPs. HGMMA.64x32x8.F32.TF32 is a
    warpgroup's m64 n32 k8 product, issued by each of its 4 warps, so a quarter of it per warp. Without an
    operand-type modifier HMMA/HGMMA multiply fp16.
    """
    parts = opcode.split(".")
    if instruction_class(opcode) != "tensor" or len(parts) < 2:
        return None
    kind = next((_MMA_TYPES[p] for p in parts[2:] if p in _MMA_TYPES), "fp16")
    shape = parts[1]
    if "x" in shape:  # warpgroup MMA: MxNxK
        try:
            m, n, k = (int(s) for s in shape.split("x"))
        except ValueError:
            return None
        return kind, 2 * m * n * k // 4
    match = re.fullmatch(r"(16|8)(8)(\d+)", shape)  # warp MMA: m, n = 8, k run together ("16816")
    if not match:
        return None
    m, n, k = (int(g) for g in match.groups())
    return kind, 2 * m * n * k


_INSTRUCTION = re.compile(r"^\s*/\*(?P<address>[0-9a-f]+)\*/\s+(?P<body>[^;]*);")
_PREDICATE = re.compile(r"^(@!?U?P(?:T|\d))\s+")
_LOCATION = re.compile(r'"([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L\w+):")
_TARGET = re.compile(r"`\((\.L\w+)\)")
_FUNCTION = re.compile(r"^\.text\.(\S+):")


def parse_sass(text: str) -> Listing:
    """The first kernel of an ``nvdisasm -c -gi`` listing. ValueError if the text holds no instructions."""
    function, instructions, labels, pending, current = None, [], {}, [], ()
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("//## File"):
            for file, number in _LOCATION.findall(line):
                if not pending or pending[-1] != (file, int(number)):
                    pending.append((file, int(number)))
            continue
        found = _FUNCTION.match(line)
        if found:
            if function is not None and instructions:
                break  # only the first kernel
            function = found.group(1)
            continue
        found = _LABEL.match(line)
        if found:
            labels[found.group(1)] = None  # the address of the next instruction
            continue
        found = _INSTRUCTION.match(raw)
        if not found:
            continue
        address = int(found.group("address"), 16)
        for label, at in labels.items():
            if at is None:
                labels[label] = address
        if pending:
            current, pending = tuple(pending), []
        body = found.group("body").strip()
        predicate = _PREDICATE.match(body)
        if predicate:
            body = body[predicate.end():]
        opcode, _, operands = body.partition(" ")
        target = _TARGET.search(operands)
        is_jump = opcode.split(".")[0] in ("BRA", "JMP", "BRX", "JMX")
        instructions.append(Instruction(address, opcode, operands.strip(), predicate.group(1) if predicate else "",
                                        current, target.group(1) if target and is_jump else None))
    if not instructions:
        raise ValueError("no SASS instructions found in the listing (is it nvdisasm -c output?)")
    return Listing(function or "?", tuple(instructions), {k: v for k, v in labels.items() if v is not None})


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c -gi`` of a cubin, with the nvdisasm that Triton's NVIDIA backend ships."""
    from triton import knobs

    tool = knobs.nvidia.nvdisasm.path
    with tempfile.TemporaryDirectory(prefix="emim-sass-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([tool, "-c", "-gi", path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm failed (exit status {done.returncode}): {done.stderr.strip()}")
    return done.stdout
