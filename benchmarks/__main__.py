"""Run benchmarks: `python -m benchmarks` (all registered) or `python -m benchmarks <name> [flags]`.

Each benchmark is a module in this package exposing `add_arguments(parser)` and `run(args)`; register it in
`BENCHMARKS` below to get a subcommand (flags from `add_arguments`, `--help` for the list).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "outlook": ("benchmarks.bench_outlook", "VOLO outlook attention: jitted JAX vs timm eager, forward and backward"),
    "models": ("benchmarks.bench_models", "whole models vs timm eager/compile: inference, train step, compile, "
                                          "memory, conversion"),
    "xla": ("benchmarks.bench_xla", "XLA compiler options A/B: our programs with XLA's defaults vs "
                                    "volo_jax.xla.compiler_options()"),
    "input": ("benchmarks.bench_input", "input pipeline alone: our grain streams vs timm transforms + DataLoader"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", metavar="{" + ",".join(BENCHMARKS) + "}")
    modules = {}
    for name, (module_name, help_text) in BENCHMARKS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.name is None:  # no subcommand: every registered benchmark with its default flags
        for name in BENCHMARKS:
            print(f"== {name} ==", flush=True)
            modules[name].run(sub.choices[name].parse_args([]))
    else:
        modules[args.name].run(args)


if __name__ == "__main__":
    from volo_jax.xla import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()  # the same process setting for JAX and torch (see volo_jax.xla)
    main(sys.argv[1:])
