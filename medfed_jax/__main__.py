"""``python -m medfed_jax``: see `medfed_jax.cli`."""

from medfed_jax.cli import run_main

if __name__ == "__main__":
    run_main()
