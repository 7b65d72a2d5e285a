"""The configs shipped with medfed_jax, run by name: ``python -m medfed_jax --config=heart_fedavg``.

Installed as the package ``medfed_jax.configs`` (``package_dir`` in setup.cfg);
`medfed_jax.config_files.load_config` finds them by name, in a checkout or an
installed package alike.
"""
