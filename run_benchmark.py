#!/usr/bin/env python
"""sslbench entry point: `python run_benchmark.py --help`."""

import sys

from benchmark.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
