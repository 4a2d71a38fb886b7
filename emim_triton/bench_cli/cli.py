"""The `emim-bench` command line (also `python -m emim_triton.bench_cli`).

    emim-bench roofline [--shape B,T,H,W,heads,D,K | --model NAME] [--dtype bf16] [--gpu h200]
    emim-bench autotune [--shape ... | --model NAME] [--dtype bf16] [--max-configs 64] [--list]
    emim-bench compare  [--shape ... | --model NAME] [--dtype bf16] [--device cuda] [--backends ...]
                        [--json out.json] [--csv out.csv] [--plot out.png]

Without --shape or --model each command uses the default cases (bench/cases.py). Output paths (--json,
--csv, --plot, --write-defaults, the tuning cache) are checked before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from ..checks import DIRECTIONS
from ..cost_model import MODES
from ..environment import STRATEGIES
from .backends import BACKENDS, DEFAULT_BACKENDS
from .cases import DTYPES, BenchCase, cases_from_model, default_cases, parse_shape
from ..output_paths import directory_problem, file_problem
from .gpus import GPUS
from .roofline import DATASHEETS, Ceilings, datasheet_ceilings

STATIC_DEFAULT_SHAPE = "32,16,14,14,5,64,7"  # UniFormer-S16 stage 3, batch 32: the shape the H200 was tuned at
MODE_ALIASES = {"forward": "forward", "fwd": "forward", "forward+backward": "forward+backward",
                "fwd+bwd": "forward+backward", "training": "forward+backward"}


class CommandError(Exception):
    """A problem with the machine or the environment (not with the arguments): exit status 1."""


def _shape(text: str) -> BenchCase:
    try:
        return parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad --shape: {e}") from None


def _choices(allowed, aliases=None):
    """A type for comma-separated lists drawn from `allowed` (values may be mapped through `aliases`)."""
    def parse(text: str) -> tuple[str, ...]:
        picked = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            value = (aliases or {}).get(item, item)
            if value not in allowed:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(allowed)}")
            picked.append(value)
        if not picked:
            raise argparse.ArgumentTypeError("the list is empty")
        return tuple(dict.fromkeys(picked))
    return parse


def _at_least_one(text: str) -> int:
    value = _positive_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _sides(text: str) -> tuple[int, ...]:
    try:
        sides = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame sides, e.g. 7,14,28, got {text!r}") from None
    if not sides or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"frame sides must be >= 1, got {text!r}")
    return sides


def _add_case_options(p: argparse.ArgumentParser, dtype_default: str | None = "bf16") -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--shape", type=_shape, action="append", metavar="B,T,H,W,heads,D,K",
                       help="a shape to run (repeatable), e.g. 32,16,14,14,5,64,7")
    which.add_argument("--model", metavar="NAME",
                       help="the EMIM layer shapes of a model-zoo model, e.g. emim_uniformer_s16")
    p.add_argument("--batch", type=int, default=32, help="batch size for --model (default 32)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=dtype_default,
                   help="activation dtype" + (f" (default {dtype_default})" if dtype_default else
                                              " (default bf16 on a GPU, fp32 on the CPU)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emim-bench", description="Tune, benchmark and cost the fused EMIM kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{roofline,autotune,compare,static}")

    p = commands.add_parser("roofline", help="FLOP and byte counts and the two floors of a shape (no GPU needed)",
                            description="Print the cost model's FLOPs and bytes and the memory and compute "
                                        "floors. Ceilings: a datasheet's (--gpu) or your own numbers.")
    _add_case_options(p)
    p.add_argument("--gpu", choices=tuple(DATASHEETS), default="h200", help="datasheet ceilings (default h200)")
    p.add_argument("--bandwidth", type=float, metavar="TB/s", help="copy bandwidth to use instead of the datasheet's")
    p.add_argument("--tflops", type=float, metavar="TFLOP/s", help="matrix rate to use instead of the datasheet's")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")

    p = commands.add_parser("autotune", help="tune every kernel for some shapes on this GPU and write the cache",
                            description="Time each kernel's candidate launch configurations on this GPU, "
                                        "print the winners and store them in the tuning cache "
                                        "($EMIM_TRITON_CACHE, default ~/.cache/emim_triton).")
    _add_case_options(p)
    p.add_argument("--max-configs", type=_positive_int, default=64, metavar="N",
                   help="time at most N candidates per kernel, 0 = all (default 64)")
    p.add_argument("--warmup-ms", type=float, default=25, help="warm-up per candidate (default 25 ms)")
    p.add_argument("--rep-ms", type=float, default=100, help="timing per candidate (default 100 ms)")
    p.add_argument("--list", action="store_true", help="only list the pruned search spaces (no GPU needed)")
    p.add_argument("--write-defaults", nargs="?", const="", metavar="PATH",
                   help="also add the winners to the shipped defaults (default: the package's data file)")

    p = commands.add_parser("compare", help="fused op vs eager reference vs torch.compile vs FlexAttention",
                            description="Time every backend on the same inputs in one run: median time, "
                                        "TFLOP/s, GB/s, fraction of the roofline, peak memory, speed-ups.")
    _add_case_options(p, dtype_default=None)
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="where to run (default cuda if available, else cpu with small shapes)")
    p.add_argument("--backends", type=_choices(BACKENDS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default: all that run on the device)")
    p.add_argument("--modes", type=_choices(MODES, MODE_ALIASES), default=MODES, metavar="LIST",
                   help="forward, forward+backward or both (default both)")
    p.add_argument("--rotate", type=int, default=3, metavar="N", help="input sets cycled while timing (default 3)")
    p.add_argument("--warmup-ms", type=float, default=25, help="warm-up budget per measurement (default 25 ms)")
    p.add_argument("--rep-ms", type=float, default=100, help="timing budget per measurement (default 100 ms)")
    p.add_argument("--no-tune", action="store_true",
                   help="do not autotune the fused kernels; use cached, shipped or heuristic configurations")
    p.add_argument("--max-configs", type=_positive_int, default=64, metavar="N",
                   help="when tuning, time at most N candidates per kernel, 0 = all (default 64)")
    p.add_argument("--sweep", type=_sides, metavar="SIDES",
                   help="add variants of the first case with H = W = each side, for the scaling curve")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the results as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: a bar chart per case and the scaling curve")
    p.add_argument("--direction", choices=DIRECTIONS, default="next",
                   help="the op's frame pairing: next (the paper's, default) or prev (causal)")
    p.add_argument("--dilation", type=_at_least_one, default=1, metavar="D", help="window dilation (default 1)")

    p = commands.add_parser("static", help="each kernel's GPU time predicted from its SASS (no GPU needed)",
                            description="Compile the op's kernels for a GPU on the CPU, count their SASS "
                                        "instructions weighted by loop trip counts, and model each kernel's time "
                                        "as the largest of the issue, tensor-core and memory floors.")
    p.add_argument("--shape", type=_shape, default=_shape(STATIC_DEFAULT_SHAPE), metavar="B,T,H,W,heads,D,K",
                   help=f"the shape to model (default {STATIC_DEFAULT_SHAPE}, UniFormer-S16 stage 3)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="activation dtype (default bf16)")
    p.add_argument("--gpu", choices=tuple(GPUS), default="h200", help="the GPU to model (default h200)")
    p.add_argument("--configs", choices=("shipped", "heuristic"), default="shipped",
                   help="launch configurations: those shipped for the GPU (the heuristic's where none is "
                        "shipped for the shape) or the heuristic's (default shipped)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--sass-dir", metavar="DIR", help="also write each kernel's SASS listing there")
    p.add_argument("--no-cache", action="store_true", help="compile again even if cached")
    p.add_argument("--forward", choices=STRATEGIES, default=STRATEGIES[0],
                   help="the forward strategy to model (default offset_loop, what the op runs unless a tuned "
                        "entry chose tensor_core or EMIM_TRITON_FORWARD forces it)")
    p.add_argument("--backward", choices=STRATEGIES, default=STRATEGIES[0],
                   help="the backward strategy of the query and key/value kernels to model (default offset_loop, "
                        "what the op runs unless a tuned entry chose tensor_core or EMIM_TRITON_BACKWARD "
                        "forces it)")
    return parser


def check_output_files(parser: argparse.ArgumentParser, **paths: str | None) -> None:
    """Exit with a usage error (status 2) unless every given output path (flag name -> path, None = not
    given) can be written, and no two flags name the same file (one would overwrite the other). Called
    before any work, so that a bad path does not lose a run's results at the end."""
    seen: dict[str, str] = {}
    for name, path in paths.items():
        if path is None:
            continue
        flag = "--" + name.replace("_", "-")
        problem = file_problem(path)
        if problem:
            parser.error(f"{flag} {path!r}: {problem}")
        same = seen.setdefault(os.path.realpath(path), flag)
        if same != flag:
            parser.error(f"{same} and {flag} both name {path!r}; give each output its own file")


def _cases(args, parser, device_type: str) -> list[BenchCase]:
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.model:
        try:
            return list(cases_from_model(args.model, batch=args.batch))
        except (LookupError, RuntimeError) as e:
            parser.error(str(e).strip("'\""))
    return list(args.shape) if args.shape else list(default_cases(device_type))


def _roofline(args, parser) -> int:
    from .roofline import format_roofline, roofline_entries

    for name in ("bandwidth", "tflops"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    check_output_files(parser, json=args.json)
    ceilings = datasheet_ceilings(args.gpu, args.dtype)
    if args.bandwidth or args.tflops:
        ceilings = Ceilings(args.bandwidth * 1e12 if args.bandwidth else ceilings.bandwidth,
                            args.tflops * 1e12 if args.tflops else ceilings.matmul_flops,
                            "given on the command line" + ("" if args.bandwidth and args.tflops
                                                           else f", the rest from the {ceilings.source}"))
    cases = _cases(args, parser, "cuda")
    entries = roofline_entries(cases, DTYPES[args.dtype], ceilings)
    print(format_roofline(entries, DTYPES[args.dtype], ceilings))
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "ceilings": dataclasses.asdict(ceilings), "cases": entries}, f, indent=1)
    return 0


def _autotune(args, parser) -> int:
    from pathlib import Path

    from ..environment import interpreter_enabled
    from ..tuning_cache import CACHE_ENV, default_cache_dir
    from .tune import list_candidates, run_autotune, shipped_defaults_path

    target = None
    if args.write_defaults is not None:
        if args.list:
            parser.error("--write-defaults has nothing to write with --list, which tunes nothing")
        target = Path(args.write_defaults) if args.write_defaults else shipped_defaults_path()
        check_output_files(parser, write_defaults=str(target))
        if target.exists():  # it is merged into after tuning: unreadable, it would fail only then
            try:
                json.loads(target.read_text())
            except (OSError, ValueError) as e:
                parser.error(f"--write-defaults {str(target)!r} exists and is not readable JSON ({e})")
    cases = _cases(args, parser, "cuda")
    dtype = DTYPES[args.dtype]
    if args.list:
        list_candidates(cases, dtype)
        return 0
    cache_dir = default_cache_dir()
    problem = directory_problem(cache_dir)
    if problem:  # each tuned shape is stored at once: an unusable cache would fail after the first
        raise CommandError(f"the tuning cache directory {str(cache_dir)!r} cannot be written: {problem}; "
                           f"set {CACHE_ENV} to a writable directory")
    if not torch.cuda.is_available():
        raise CommandError("autotune times the kernels on a CUDA GPU and torch sees none here "
                           "(use --list to see the search spaces without one)")
    if interpreter_enabled():
        raise CommandError("TRITON_INTERPRET=1 is set: the interpreter runs one configuration and there is "
                           "nothing to tune; unset it to tune on the GPU")
    run_autotune(cases, dtype, max_configs=args.max_configs or None, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                 write_defaults=target)
    return 0


def _compare(args, parser) -> int:
    from .compare import Settings, run_compare
    from .report import format_table, write_csv, write_json

    check_output_files(parser, json=args.json, csv=args.csv, plot=args.plot)
    if args.plot is not None:  # fail now, not after the whole run
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install matplotlib (it is in the dev extra)") from None
        # matplotlib picks the format from the extension (PNG without one) and refuses one it lacks.
        extension = os.path.splitext(args.plot)[1][1:].lower()
        formats = FigureCanvasBase.get_supported_filetypes()
        if extension and extension not in formats:
            parser.error(f"--plot {args.plot!r}: matplotlib cannot write .{extension} files; expected one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: torch sees no CUDA GPU here; use --device cpu for the CPU backends")
    if args.rotate < 1:
        parser.error(f"--rotate must be >= 1, got {args.rotate}")
    cases = _cases(args, parser, device_type)
    if args.sweep:
        first = cases[0].shape
        cases += [BenchCase(f"{cases[0].name}-{side}x{side}", dataclasses.replace(first, height=side, width=side))
                  for side in args.sweep if (side, side) != (first.height, first.width)]
    dtype = DTYPES[args.dtype or ("bf16" if device_type == "cuda" else "fp32")]
    settings = Settings(device=torch.device(device_type), dtype=dtype,
                        backends=args.backends or DEFAULT_BACKENDS[device_type], modes=args.modes,
                        warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, rotate=args.rotate, tune=not args.no_tune,
                        max_configs=args.max_configs or None, direction=args.direction, dilation=args.dilation)
    report = run_compare(cases, settings, log=lambda msg: print(msg, file=sys.stderr))
    print(format_table(report))
    if args.json is not None:
        write_json(report, args.json)
    if args.csv is not None:
        write_csv(report, args.csv)
    if args.plot is not None:
        from .plots import plot_report

        plot_report(report, args.plot)
    return 0


def _static(args, parser) -> int:
    check_output_files(parser, json=args.json)
    if args.sass_dir is not None and (problem := directory_problem(args.sass_dir)):
        parser.error(f"--sass-dir {args.sass_dir!r}: {problem}")
    from . import static  # here: it imports Triton's compiler, which the other commands do not need

    return static.run(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = {"roofline": _roofline, "autotune": _autotune, "compare": _compare, "static": _static}[args.command]
    try:
        return command(args, parser)
    except CommandError as e:
        print(f"emim-bench {args.command}: error: {e}", file=sys.stderr)
        return 1

