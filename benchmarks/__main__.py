"""Run benchmarks: `python -m benchmarks` (all registered) or `python -m benchmarks <name> [flags]`.

`--readme README.md` (after the subcommand, or alone for all of them) also writes each benchmark's tables into its
block of that file, with the command, the date and the machine (see `benchmarks/report.py`); `make bench` runs every
benchmark that way.

Each benchmark is a module in this package exposing `add_arguments(parser)` and `run(args) -> Recorder` (the
markdown it printed); register it in `BENCHMARKS` below to get a subcommand (flags from `add_arguments`, `--help`
for the list).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks.report import command_line, find_block

# subcommand -> (module, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "outlook": ("benchmarks.bench_outlook", "VOLO outlook attention: jitted JAX vs timm eager, forward and backward"),
    "models": ("benchmarks.bench_models", "whole models vs timm eager/compile: inference, train step, compile, "
                                          "memory, conversion"),
    "xla": ("benchmarks.bench_xla", "XLA compiler options A/B: our programs with XLA's defaults vs "
                                    "volo_jax.xla.compiler_options()"),
    "input": ("benchmarks.bench_input", "input pipeline alone: our grain streams vs timm transforms + DataLoader"),
}

README_HELP = ("also write the tables into the <!-- benchmarks:NAME --> ... <!-- /benchmarks:NAME --> block of this "
               "markdown file (e.g. README.md), atomically, with the command, date and machine; nothing is written "
               "if the benchmark fails, and the run stops at once if the file lacks the markers")


def _add_readme(parser: argparse.ArgumentParser, dest: str = "readme") -> None:
    parser.add_argument("--readme", dest=dest, default=None, metavar="PATH", help=README_HELP)


def _check_markers(path: str, names: list[str]) -> None:
    """Fail before an hour of benchmarking, not after, when the README cannot take the tables."""
    try:
        text = open(path).read()
        for name in names:
            find_block(text, name, path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--readme: {e}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    _add_readme(parser, dest="readme_all")  # its own dest: a subcommand's default would overwrite a shared one
    sub = parser.add_subparsers(dest="name", metavar="{" + ",".join(BENCHMARKS) + "}")
    modules = {}
    for name, (module_name, help_text) in BENCHMARKS.items():
        modules[name] = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        modules[name].add_arguments(sp)
        _add_readme(sp)
    args = parser.parse_args(argv)
    command = command_line(argv)
    names = list(BENCHMARKS) if args.name is None else [args.name]
    readme = getattr(args, "readme", None) or args.readme_all
    if readme:
        _check_markers(readme, names)
    if args.name is None:  # no subcommand: every registered benchmark with its default flags
        for name in names:
            print(f"== {name} ==", flush=True)
            recorder = modules[name].run(sub.choices[name].parse_args([]))
            if readme:  # each block as soon as its benchmark is done: a later failure keeps the earlier ones
                recorder.write(readme, name, command)
    else:
        recorder = modules[args.name].run(args)
        if readme and recorder is not None:
            recorder.write(readme, args.name, command)


if __name__ == "__main__":
    from volo_jax.xla import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()  # the same process setting for JAX and torch (see volo_jax.xla)
    main(sys.argv[1:])
