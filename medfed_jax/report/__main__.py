"""Figures and ``report.md`` from a sweep's workdir (``sweep.json``, ``summary.csv``).

    python -m medfed_jax.report --workdir=runs/signflip
    python -m medfed_jax.report --workdir=runs/a --workdir=runs/b --readme=README.md

``--readme`` rewrites the README's Results section, ``--section=FILE`` writes it to FILE instead;
what each figure and table shows: `medfed_jax.report`.
"""

from absl import app

from medfed_jax import host_devices
from medfed_jax.report.cli import define_flags, main

if __name__ == "__main__":
    define_flags()
    host_devices.quiet_backend_probe()
    app.run(main)
