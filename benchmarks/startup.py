"""Startup: how long until the first result, cold (empty compilation cache) and warm (the same cache again).

Each measurement is a fresh ``python`` process running the command line with
``--compilation_cache=<folder>``: *cold* on a new, empty folder, *warm* on the
same folder right after. Scenarios: ``configs/quickstart.py``, the heart
headline's federated run alone, ``make demo`` (heart, seven methods, five
seeds) and the collaboration sweep (``configs/collaboration.py``). Phases, from
JAX's own monitoring events (the union of their time spans, so nested and
concurrent spans count once):

- *import*: what ``python -m medfed_jax`` imports (`medfed_jax.__main__`: the
  command line, JAX, optax and flax), inside the process;
- *trace*: tracing Python to jaxprs and lowering them to StableHLO;
- *compile*: XLA compiling, or reading the program from the persistent cache;
- *other*: the rest of the process's wall time: interpreter start, data,
  validation, running the rounds, writing results (a sweep compiles on a
  background thread while chunks run: its compile and run time overlap).

``programs`` counts XLA compiles, ``hits`` the programs read from the cache.
A separate process times ``python -c "import medfed_jax"`` alone. These machines
are shared: run it on a quiet machine and read the ratios (cold / warm, before /
after) within one run.

    python benchmarks/startup.py                               # every scenario at full size
    python benchmarks/startup.py --small --out=/tmp/startup.md # 2 rounds each: proof that it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = {
    "quickstart": ["--config=configs/quickstart.py"],
    "heart federated": ["--config=configs/heart_fedavg.py", "--config.baselines=()"],
    "make demo": ["--config=configs/heart_fedavg.py", "--seeds=5"],
    "collaboration sweep": ["--config=configs/collaboration.py"],
}
SMALL = ["--config.rounds=2", "--config.eval_every=1"]
TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
HIT_EVENT = "/jax/compilation_cache/cache_hits"
MIN_LISTED_SECONDS = 0.1


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``[start, end]`` intervals."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def child(report: str, argv: list[str]) -> None:
    """Run the command line on ``argv`` in this process; write its phases to ``report`` (JSON)."""
    start = time.time()
    from medfed_jax import __main__ as entry  # what `python -m medfed_jax` imports, and how

    imported = time.time()
    import jax

    spans: dict[str, list[tuple[float, float]]] = {}
    hits, programs = [], []

    def on_span(event: str, begin: float, end: float, **kwargs) -> None:
        spans.setdefault(event, []).append((begin, end))
        if event == COMPILE_EVENT:
            programs.append((kwargs.get("fun_name", "?"), end - begin))

    jax.monitoring.register_event_time_span_listener(on_span)
    jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e == HIT_EVENT else None)
    sys.argv = ["medfed_jax", *argv]
    try:
        entry.run_main()
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    end = time.time()
    trace = [s for e in TRACE_EVENTS for s in spans.get(e, [])]
    compile_spans = spans.get(COMPILE_EVENT, [])
    result = {
        "in_process": end - start,
        "import": imported - start,
        "trace": union_seconds(trace),
        "compile": union_seconds(compile_spans),
        "jax": union_seconds(trace + compile_spans),
        "programs": len(compile_spans) - len(hits),
        "hits": len(hits),
        "per_program": programs,  # (name, seconds) of each compile or cache read, in order
    }
    with open(report, "w") as f:
        json.dump(result, f)


def measure(argv: list[str], cache: str, workdir: str) -> dict:
    """One fresh process of ``python benchmarks/startup.py --child``; its phases and wall time."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = f.name
    command = [sys.executable, __file__, f"--child={report}", "--", *argv]
    command += [f"--compilation_cache={cache}", f"--workdir={workdir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    with open(report) as f:
        result = json.load(f)
    os.remove(report)
    result["wall"] = wall
    result["other"] = wall - result["import"] - result["jax"]
    return result


def cold_and_warm(runs: dict) -> list[tuple[str, float, float]]:
    """``(program, cold s, warm s)`` in the cold run's order, the n-th compile of a name paired with the
    n-th of the warm run (compiles on other threads may end in another order)."""
    warm: dict[str, list[float]] = {}
    for name, seconds in runs["warm"]["per_program"]:
        warm.setdefault(name, []).append(seconds)
    return [(name, seconds, warm[name].pop(0)) for name, seconds in runs["cold"]["per_program"]]


def import_seconds() -> float:
    """Wall time of ``python -c "import medfed_jax"`` (interpreter start included)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import medfed_jax"], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="2 rounds per run (a check that the script works)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of the scenarios")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args, rest = parser.parse_known_args()
    if args.child:
        child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    names = [n.strip() for n in args.scenarios.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"--scenarios: unknown {unknown}; choose from {list(SCENARIOS)}.")
    import jax

    started = load()
    chosen = f" --scenarios='{args.scenarios}'" if names != list(SCENARIOS) else ""
    lines = [
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}, backend {jax.default_backend()}",
        f"- command: `python benchmarks/startup.py{' --small' if args.small else ''}{chosen}`",
        f'- `python -c "import medfed_jax"`: {import_seconds():.2f} s',
        "",
        "| scenario | cache | wall s | import s | trace s | compile s | other s | programs | hits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    per_program = []
    for name in names:
        argv = SCENARIOS[name] + (SMALL if args.small else [])
        runs = {}
        with tempfile.TemporaryDirectory() as tmp:
            cache = os.path.join(tmp, "cache")
            for state in ("cold", "warm"):
                r = runs[state] = measure(argv, cache, os.path.join(tmp, state))
                lines.append(
                    f"| {name} | {state} | {r['wall']:.2f} | {r['import']:.2f} | {r['trace']:.2f} | "
                    f"{r['compile']:.2f} | {r['other']:.2f} | {r['programs']} | {r['hits']} |"
                )
                print(lines[-1], flush=True)
        slow = [(p, cold, warm) for p, cold, warm in cold_and_warm(runs) if cold >= MIN_LISTED_SECONDS]
        per_program.append(f"- {name}: " + ", ".join(f"{p} {cold:.2f} -> {warm:.2f}" for p, cold, warm in slow))
    lines.insert(2, f"- load average (1/5/15 min) at start {started}, at end {load()}")
    lines += [
        "",
        f"Per program (compiles of at least {MIN_LISTED_SECONDS} s cold), cold s -> warm s:",
        "",
        *per_program,
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
