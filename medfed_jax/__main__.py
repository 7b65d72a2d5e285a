"""``python -m medfed_jax --config=<name or file.py> ...``; ``--help`` lists every flag and config field."""

from medfed_jax.cli import run_main

if __name__ == "__main__":
    run_main()
