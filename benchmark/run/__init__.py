"""Orchestration, the top layer: the command line (`cli`), planning and running a grid (`runner`), executors (local,
submitit debug, SLURM), the `--out` lock (`lock`), `status`, the named suites (`suites.yaml`) and the `throughput` command. Imports every layer
below and the plugin packages; nothing imports it."""
