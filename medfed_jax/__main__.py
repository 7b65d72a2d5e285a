"""``python -m medfed_jax --config=<name or file.py> ...``; ``--help`` lists every flag and config field."""

import gc

gc.disable()  # importing JAX makes ~10^5 objects that live as long as the process: `run_main` freezes them
from medfed_jax.cli import run_main  # noqa: E402

if __name__ == "__main__":
    run_main()
