"""The `convlower` command line.

Exit codes: 0 success (verify: equivalent); 1 verification failed or the result would be wrong;
2 bad usage or bad input (one line on stderr saying what and how to mend it); 3 an internal error
(a convlower bug: `--verbose` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import __version__, console
from .errors import ConvlowerError, UsageError
from .runner import PROVIDER_CHOICES
from .shapes import parse_input_shape

if TYPE_CHECKING:
    from .cache import TuningCache

EXIT_INTERNAL = 3


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", f"see '{self.prog} --help'")


def _add_shapes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:DIMS",
                   help="profiling shape of an input, e.g. x:1x3x224x224 (binds its symbolic dims); "
                        "optimize: name an input again for another profile")
    p.add_argument("--inputs", metavar="DATA.npz", help="real input arrays by input name")


def _add_provider(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default=default,
                   help=f"execution provider (default {default}; auto = CUDA where it loads, else CPU)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convlower", description="Lower Conv-like ONNX nodes into faster, verified subgraphs.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks, and notices with their whole reason")
    parser.add_argument("--version", action="version", version=f"convlower {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("optimize", help="tune every Conv-like node and write the fastest verified model")
    p.add_argument("model")
    p.add_argument("-o", "--output", help="output path (default MODEL stem + .convlower.onnx)")
    _add_shapes(p)
    _add_provider(p)
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache", action="append", metavar="PATH|URL",
                       help="tuning cache: a JSON file or redis://HOST:PORT/DB (rediss:// for TLS); repeat to layer "
                            "them, front first, e.g. a local file before Redis (default ~/.cache/convlower/tuning.json)")
    cache.add_argument("--no-cache", action="store_true", help="tune from scratch and keep nothing")
    p.add_argument("--report", metavar="REPORT.json", help="JSON report path (default OUT stem + .json)")
    p.add_argument("--variants", action="append", default=[], metavar="OP=V1,V2", help="limit the variants tried for an op")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default by dtype)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default by dtype)")
    confirm = p.add_mutually_exclusive_group()
    confirm.add_argument("--confirm", choices=("model", "neighbours"), default="model",
                         help="where each group's choice is confirmed before the guard: the whole model (default) "
                              "or a micro-model of the group's fusable neighbours")
    confirm.add_argument("--no-confirm", action="store_true",
                         help="trust the per-node timings: skip confirming each group's choice in context")
    p.add_argument("--no-guard", action="store_true", help="skip the whole-model check and timing (and the confirmation)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="bound the whole run: write the best verified model found in this time; the report lists what was not tried")
    p.add_argument("--force", action="store_true", help="allow the output to overwrite the input")

    p = sub.add_parser("verify", help="check two models compute the same outputs (exit 0 equal, 1 not)")
    p.add_argument("reference")
    p.add_argument("candidate")
    _add_shapes(p)
    p.add_argument("--runs", type=int, default=3, help="random input sets to compare on (default 3)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default by dtype)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default by dtype)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    _add_provider(p, default="cpu")

    p = sub.add_parser("lower", help="apply one variant to every node it fits, no timing")
    p.add_argument("model")
    p.add_argument("--variant", action="append", required=True, metavar="OP=NAME", help="e.g. conv=im2col (repeatable)")
    p.add_argument("-o", "--output", help="output path (default MODEL stem + .convlower.onnx)")
    p.add_argument("--no-ops", default="", metavar="OP,OP", help="fail (exit 1) if any of these ops remain")
    p.add_argument("--force", action="store_true", help="allow the output to overwrite the input")

    p = sub.add_parser("inspect", help="list Conv-like nodes, their shapes, attributes and variants")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="median latency of a model, or two interleaved A/B")
    p.add_argument("model")
    p.add_argument("other", nargs="?")
    _add_shapes(p)
    _add_provider(p)
    p.add_argument("--runs", type=int, default=200, help="most timed runs per model (default 200)")
    p.add_argument("--json", action="store_true")

    store = _Parser(add_help=False)
    store.add_argument("--cache", action="append", metavar="PATH|URL",
                       help="the cache, as for optimize (default ~/.cache/convlower/tuning.json); repeat to layer them")
    p = sub.add_parser("cache", help="show, export, import or clear tuning cache entries (a file or Redis)")
    actions = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    a = actions.add_parser("show", parents=[store], help="entries counted by provider, device, onnxruntime and threads")
    a.add_argument("--json", action="store_true")
    a = actions.add_parser("export", parents=[store], help="copy every entry into a JSON cache file (merged if it exists)")
    a.add_argument("file")
    a = actions.add_parser("import", parents=[store], help="copy every entry of a JSON cache file into the cache")
    a.add_argument("file")
    a = actions.add_parser("clear", parents=[store], help="delete the entries of one device and/or onnxruntime version")
    a.add_argument("--device", help="the device as 'cache show' lists it (the report's device field)")
    a.add_argument("--onnxruntime", metavar="VERSION", help="e.g. 1.22.0")
    a.add_argument("--all", action="store_true", help="delete every entry")

    p = sub.add_parser("demo", help="export, optimize and check a bundled dynamic-filter or cost-volume model")
    p.add_argument("--model", default="involution",
                   help="kpn_denoiser, involution, carafe, seed_filter, stereo, flow or dcn_head (default involution)")
    p.add_argument("--report", metavar="REPORT.json", help="write the optimize report, with the error against torch, as JSON")
    _add_provider(p)
    return parser


def _shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """One shape per input, for the commands that run at one profile."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in map(parse_input_shape, items):
        if name in shapes:
            raise UsageError(f"--input-shape names {name!r} twice", "several profiles are for optimize; give one shape here")
        shapes[name] = shape
    return shapes


def _profiles(items: Sequence[str]) -> dict[str, list[tuple[int, ...]]]:
    """Shapes by input name in the order given; naming an input again adds a profile."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for name, shape in map(parse_input_shape, items):
        shapes.setdefault(name, []).append(shape)
    return shapes


def _cmd_optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .modelio import check_output_path, default_output_path, save_model, write_text_atomic
    from .optimize import USE_DEFAULT_CACHE, optimize

    out = check_output_path(args.output or default_output_path(args.model), protect=args.model, force=args.force)
    report_path = check_output_path(args.report or out.with_suffix(".json"), protect=args.model, force=args.force)
    cache = None if args.no_cache else (args.cache or USE_DEFAULT_CACHE)
    result = optimize(
        args.model, input_shapes=_profiles(args.input_shape), inputs=args.inputs, provider=args.provider,
        threads=args.threads, cache=cache, variants=args.variants, atol=args.atol, rtol=args.rtol,
        guard=not args.no_guard, confirm=False if args.no_confirm else args.confirm, progress=sys.stderr.isatty(),
        budget=args.budget,
    )
    save_model(result.model, out, protect=args.model, force=args.force)
    write_text_atomic(report_path, result.report.to_json())
    for notice in result.report.notices:
        console.notice(notice)
    if args.verbose and result.report.provider_reason:
        console.notice(result.report.provider_reason)
    if result.report.nodes:
        Console(width=160).print(result.report.table())
    print(result.report.summary())
    print(f"wrote {out} and {report_path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    result = verify(
        args.reference, args.candidate, input_shapes=_shapes(args.input_shape), inputs=args.inputs,
        runs=args.runs, atol=args.atol, rtol=args.rtol, provider=args.provider,
    )
    print(result.to_json() if args.json else result)
    return 0 if result else 1


def _cmd_lower(args: argparse.Namespace) -> int:
    from .lower import lower
    from .modelio import check_output_path, default_output_path, save_model

    no_ops = [op.strip() for op in args.no_ops.split(",") if op.strip()]
    out = check_output_path(args.output or default_output_path(args.model), protect=args.model, force=args.force)
    result = lower(args.model, args.variant, no_ops=no_ops)
    save_model(result.model, out, protect=args.model, force=args.force)
    for node in result.nodes:
        print(f"{node.name} [{node.op}]: {node.variant or 'left as is: ' + str(node.reason)}")
    print(f"lowered {len(result.lowered)} of {len(result.nodes)} node(s); wrote {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_model, to_json, to_table

    infos = inspect_model(args.model)
    print(to_json(infos) if args.json else to_table(infos))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench

    result = bench(args.model, args.other, input_shapes=_shapes(args.input_shape), inputs=args.inputs,
                   provider=args.provider, threads=args.threads, runs=args.runs)
    print(result.to_json() if args.json else result)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from .cache import FileCache, TuningCache, default_cache_path, environments, matches

    store = TuningCache.open(args.cache or default_cache_path())
    where = store.describe()
    if args.action == "show":
        rows = environments(store.entries())
        _check_store(store)
        if args.json:
            print(json.dumps({"cache": where, "environments": rows}, indent=1))
        else:
            _print_environments(where, rows)
    elif args.action == "export":
        target = FileCache(args.file)
        found = store.entries()
        _check_store(store)
        for key, entry in found.items():
            target.put(key, entry)
        target.save()
        _check_store(target)
        print(f"exported {len(found)} entries from {where} to {args.file}")
    elif args.action == "import":
        source = FileCache(args.file) if Path(args.file).is_file() else None
        if source is None or source.errors:
            raise UsageError(f"cannot import {args.file}: it is not a readable convlower tuning cache",
                             "give a file written by 'convlower cache export' or by --cache PATH")
        found = source.entries()
        for key, entry in found.items():
            store.put(key, entry)
        store.save()
        _check_store(store)
        print(f"imported {len(found)} entries from {args.file} into {where}")
    else:
        if not (args.all or args.device or args.onnxruntime):
            raise UsageError("cache clear needs --device, --onnxruntime or --all", "say which entries to delete")
        removed = store.remove(lambda key: not (args.all or matches(key, args.device, args.onnxruntime)))
        _check_store(store)
        print(f"removed {removed} entries from {where}")
    return 0


def _check_store(store: TuningCache) -> None:
    if store.errors:
        raise UsageError(f"the tuning cache could not be used: {'; '.join(store.errors)}",
                         "check the path or the Redis URL, server and password")


def _print_environments(where: str | None, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"convlower tuning cache: {where}", title_justify="left")
    for column in ("provider", "device", "onnxruntime", "threads", "entries", "problems"):
        table.add_column(column, justify="right" if column in ("threads", "entries", "problems") else "left")
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("provider", "device", "onnxruntime", "threads", "entries", "problems")))
    Console(width=160).print(table)
    print(f"{sum(r['entries'] for r in rows)} entries in {len(rows)} environment(s)")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .modelio import check_output_path

    report = check_output_path(args.report) if args.report else None
    return run_demo(args.model, args.provider, report=report)


COMMANDS = {"optimize": _cmd_optimize, "verify": _cmd_verify, "lower": _cmd_lower, "inspect": _cmd_inspect, "bench": _cmd_bench,
            "cache": _cmd_cache, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = console.verbose = "--verbose" in argv
    try:
        args = build_parser().parse_args(argv)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that closed the pipe (`| head`) is met here, inside the handler
        return code
    except BrokenPipeError:
        # the reader has what it wanted: end quietly, and keep Python from flushing into the closed pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConvlowerError as exc:
        if verbose:
            traceback.print_exc()
        console.notice(f"error: {exc}")
        return exc.exit_code
    except console.ConvlowerWarning as exc:  # PYTHONWARNINGS=error or -W error: a chosen stop, not a bug
        if verbose:
            traceback.print_exc()
        console.notice(f"error: Python's warnings filter made the warning above an error ({type(exc).__name__})")
        return UsageError.exit_code
    except KeyboardInterrupt:
        console.notice("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if verbose:
            traceback.print_exc()
        console.notice(f"internal error: {type(exc).__name__}: {exc} (rerun with --verbose and report it)")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
