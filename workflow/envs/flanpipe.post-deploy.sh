#!/usr/bin/env bash
# Runs once inside the environment flanpipe.yaml just created: install the flanpipe package itself
# (no dependencies: the environment file pins them). Snakemake runs it from the workflow's working
# directory, normally the checkout; set FLANPIPE_SRC to the checkout when running with --directory.
set -euo pipefail
python -m pip install --no-deps "${FLANPIPE_SRC:-.}"
