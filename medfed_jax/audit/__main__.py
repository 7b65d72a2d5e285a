"""``python -m medfed_jax.audit --out=DIR [--federated=CONFIG]``: see `medfed_jax.audit.cli`."""

from medfed_jax import host_devices
from medfed_jax.audit.cli import main

if __name__ == "__main__":
    host_devices.quiet_backend_probe()
    main()
