"""Compile time of the robustness matrix program, with the fixed attacks only or with the adaptive ones too.

The matrix of `configs/robustness_matrix.py` (every aggregator, one run-time
switch over the attacks) shrunk to 1 round and 1 seed so that running it
costs next to nothing beside compiling its one program. The persistent
compilation cache is off (``MEDFED_JAX_CACHE_DIR=off``), so every run compiles.
Run each setting in a fresh process on a quiet machine:

    python benchmarks/matrix_compile.py --attacks=fixed
    python benchmarks/matrix_compile.py --attacks=all
"""

from __future__ import annotations

import os
import runpy
import time

os.environ["MEDFED_JAX_CACHE_DIR"] = "off"  # measure compiling, not reading a cached program

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from medfed_jax import aggregators, attacks, sweep  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ATTACKS = flags.DEFINE_enum("attacks", "all", ["fixed", "all"], "The fixed recipes only, or with the adaptive ones.")


def main(argv):
    del argv
    names = attacks.ATTACK_NAMES
    if _ATTACKS.value == "fixed":
        names = tuple(n for n in names if n not in attacks.ADAPTIVE_ATTACKS)
    build = runpy.run_path(os.path.join(ROOT, "configs", "robustness_matrix.py"))["matrix_config"]
    cfg = build(aggregators.AGGREGATOR_NAMES, names, seeds=(0,), rounds=1)
    start = time.perf_counter()
    result = sweep.run_sweep(cfg, log=None)
    load = os.getloadavg()[0]
    print(
        f"robustness matrix, {len(aggregators.AGGREGATOR_NAMES)} aggregators x {len(names)} attacks "
        f"({_ATTACKS.value}): {result.programs_compiled} program(s) compiled in {result.compile_seconds:.1f} s "
        f"(wall {time.perf_counter() - start:.1f} s, jax {jax.__version__} {jax.default_backend()}, "
        f"1-minute load {load:.1f} at the end)"
    )


if __name__ == "__main__":
    app.run(main)
