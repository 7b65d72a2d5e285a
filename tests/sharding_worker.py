"""Run by tests/test_sharding.py in a subprocess with ``MEDFED_JAX_DEVICES=4``: writes an .npz of
single-device and 4-device results (aggregators on random updates; engine histories; a sweep in every
`medfed_jax.sweep.SWEEP_DEVICES` mode, with its workdirs next to the .npz)."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from medfed_jax import aggregators, runner, sweep
from medfed_jax import config as config_lib
from medfed_jax import mesh as mesh_lib
from medfed_jax.config import split
from medfed_jax.data.synthetic import linear_teacher
from medfed_jax.server import build_engine

RULES = {
    "weighted_mean": aggregators.weighted_mean,
    "mean": aggregators.mean,
    "coordinate_median": aggregators.coordinate_median,
    "trimmed_mean": lambda: aggregators.trimmed_mean(2),
    "krum": lambda: aggregators.krum(2),
}
# (aggregator, clients, cohort): all 10 clients, or a cohort of 10 of 12; 10 on 4 devices pads to 12.
ENGINE_CASES = [("mean", 10, 0), ("coordinate_median", 12, 10)]


def one_device() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (mesh_lib.AXIS,))


def aggregator_results(out: dict) -> None:
    rng = np.random.default_rng(0)
    updates = {"a": rng.normal(size=(12, 5, 3)).astype(np.float32), "b": rng.normal(size=(12, 4)).astype(np.float32)}
    weights = rng.integers(1, 50, size=12).astype(np.int32)
    mask = np.ones(12, bool)
    mask[[3, 8]] = False
    out.update({"updates/a": updates["a"], "updates/b": updates["b"], "weights": weights, "mask": mask})

    @jax.jit
    def every_rule(u, w, m):
        return {name: rule().aggregate(u, w, m, rule().init(u), jax.random.key(0))[0] for name, rule in RULES.items()}

    for devices, mesh in (("1", None), ("4", mesh_lib.client_mesh(12, 4))):
        results = jax.device_get(every_rule(*mesh_lib.put((updates, weights, mask), mesh, shard_clients=True)))
        out.update({f"agg/{name}/{devices}/{leaf}": v for name, r in results.items() for leaf, v in r.items()})


def engine_results(out: dict) -> None:
    for aggregator, clients, cohort in ENGINE_CASES:
        dataset = linear_teacher(clients, 12, 6, 3, seed=1)
        cfg = config_lib.default_config()
        cfg.model.widths = (8,)
        cfg.rounds, cfg.eval_every, cfg.baselines = 3, 1, ()
        cfg.local.batch_size, cfg.local.lr = 5, 0.2
        cfg.aggregator.name, cfg.cohort_size = aggregator, cohort
        prepared = runner.prepare(cfg, dataset)
        for devices, mesh in (("1", one_device()), ("4", mesh_lib.client_mesh(clients, 4))):
            engine = build_engine(split(cfg).static, prepared.context, mesh=mesh)
            train, test = runner.place_data(engine, dataset)
            history = jax.device_get(engine.program(np.uint32(0), train, test, prepared.hparams))
            for metric, value in history.items():
                out[f"engine/{aggregator}-{clients}-{cohort}/{devices}/{metric}"] = value


def sweep_config():
    """6 cells (3 seeds x 2 client learning rates) of `test_sweep.tiny_config`, in chunks of 3: on 4 devices a chunk
    of ``cells`` mode runs as 4 cells, the 4th a copy of the 3rd."""
    from test_sweep import tiny_config  # noqa: PLC0415 (this script's folder is on the path)

    cfg = tiny_config()
    cfg.sweep.grid = {"seed": (0, 1, 2), "local": {"lr": (0.05, 0.3)}}
    cfg.sweep.chunk_size = 3
    return cfg


def sweep_results(out: dict, folder: str) -> None:
    """Every mode's histories; workdirs ``sweep-<mode>``, and ``sweep-cells-resumed``: killed after one chunk, rerun."""
    for mode in sweep.SWEEP_DEVICES:
        result = sweep.run_sweep(sweep_config(), os.path.join(folder, f"sweep-{mode}"), log=None, sweep_devices=mode)
        out.update({f"sweep/{mode}/{i}/{k}": v for i, history in result.histories.items() for k, v in history.items()})

    def crash(computed: int) -> None:
        raise KeyboardInterrupt

    resumed = os.path.join(folder, "sweep-cells-resumed")
    try:
        sweep.run_sweep(sweep_config(), resumed, log=None, on_chunk=crash, sweep_devices="cells")
    except KeyboardInterrupt:
        pass
    sweep.run_sweep(sweep_config(), resumed, log=None, sweep_devices="cells")


def main() -> None:
    mesh_lib.configure_devices()  # $MEDFED_JAX_DEVICES (JAX was imported before medfed_jax could set it)
    if jax.device_count() != 4:
        raise SystemExit(f"expected 4 devices, have {jax.device_count()}")
    out: dict = {}
    aggregator_results(out)
    engine_results(out)
    sweep_results(out, os.path.dirname(os.path.abspath(sys.argv[1])))
    np.savez(sys.argv[1], **out)


if __name__ == "__main__":
    main()
