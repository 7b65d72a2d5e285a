"""``python -m medfed_jax.report``: the command line (its flags are defined only when run as a program,
so `medfed_jax.cli`, which has its own, can import the package)."""

from __future__ import annotations

import os

from absl import app, flags

from medfed_jax import tabular
from medfed_jax.report.pages import results_section, update_readme, write_report


def define_flags() -> None:
    """The command line's flags (defined by ``__main__`` only, so `medfed_jax.cli` can import the package)."""
    flags.DEFINE_multi_string("workdir", None, "Sweep workdir(s) to report on.")
    flags.DEFINE_string("readme", None, "Rewrite this README's Results section from the workdirs.")
    flags.DEFINE_string("section", None, "Write the Results section to this file (the README is left alone).")
    flags.DEFINE_string("assets", "benchmarks/figures", "Where --readme / --section copy the figures.")
    flags.DEFINE_string("command", "make reproduce", "The command named in the Results section.")
    flags.DEFINE_float("wall_seconds", None, "Wall time of the whole command, stated in the section.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if not args.workdir:
        raise app.UsageError("--workdir=<sweep workdir> is required (repeat it for several).")
    try:
        if args.readme and args.section:
            raise ValueError("--readme and --section both name where the Results section goes: give one.")
        target = args.readme or args.section
        if target:
            wall = f"; the sweeps took {args.wall_seconds / 60:.1f} min" if args.wall_seconds else ""
            section = results_section(
                args.workdir, os.path.dirname(os.path.abspath(target)), args.assets, args.command, wall
            )
            if args.readme:
                update_readme(args.readme, section)
                print(f"updated the Results section of {args.readme} (figures under {args.assets})")
            else:
                os.makedirs(os.path.dirname(os.path.abspath(args.section)), exist_ok=True)
                tabular.write_text_atomic(args.section, section + "\n")
                print(f"wrote the Results section to {args.section} (figures under {args.assets}); README.md unchanged")
        else:
            for workdir in args.workdir:
                path, figures = write_report(workdir)
                print(f"wrote {path} and {len(figures)} figure(s): {', '.join(map(os.path.basename, figures))}")
    except ValueError as e:
        raise app.UsageError(str(e)) from None
