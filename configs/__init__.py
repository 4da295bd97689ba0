"""The configs of pcp_jax (`--config=configs/ss_pcp.py` or, by name, `--config=ss_pcp`); an
install carries them as `pcp_jax.configs`."""
