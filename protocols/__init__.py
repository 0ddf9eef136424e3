"""Protocol plugins: one file per protocol. Every module in this folder (and in `<DIR>/protocols/` for each DIR in
`$SSLBENCH_PLUGINS` or `--plugins`) is imported here, which registers it; there is no list to edit."""

from benchmark.registry import discover

discover(__name__, __path__)
