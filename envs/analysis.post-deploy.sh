#!/usr/bin/env bash
# Installs ctcohort into a conda environment that `snakemake --sdm conda` has just created from the env file
# of the same name; Snakemake runs it once, in that environment, and stores a copy of it beside the
# environment, so its own location says nothing about the workflow: the checkout is $CTCOHORT_CHECKOUT (the
# workflow sets it to its own folder), else the working directory or the nearest folder above it that holds
# ctcohort's pyproject.toml and src/ctcohort.
# Editable, because the package reads resources/ beside src/, and because Snakemake keeps an environment as
# long as its env files are unchanged: a copied package would stay at the version it was created with.
# Without dependencies, which the env file pins; without build isolation, so nothing is downloaded here.
set -euo pipefail

is_checkout() {
    [ -d "$1/src/ctcohort" ] && grep -qs '^name = "ctcohort"' "$1/pyproject.toml"
}

checkout="${CTCOHORT_CHECKOUT:-}"
if [ -z "$checkout" ]; then
    folder="$PWD"
    while ! is_checkout "$folder" && [ "$folder" != / ]; do
        folder="$(dirname "$folder")"
    done
    checkout="$folder"
fi
if ! is_checkout "$checkout"; then
    echo "ctcohort's checkout not found (CTCOHORT_CHECKOUT='${CTCOHORT_CHECKOUT:-}', working directory $PWD):" \
        "set CTCOHORT_CHECKOUT to the folder that holds the workflow's Snakefile and src/ctcohort" >&2
    exit 1
fi
python -m pip install --quiet --no-deps --no-build-isolation --editable "$checkout"
# the package must now come from the checkout, with its resources beside it
python - "$checkout" <<'PY'
import sys
from pathlib import Path

import ctcohort
from ctcohort.resources import resources_dir

source = Path(sys.argv[1]).resolve() / "src" / "ctcohort"
if Path(ctcohort.__file__).resolve().parent != source:
    sys.exit(f"ctcohort comes from {ctcohort.__file__}, not from {source}")
print(f"ctcohort {ctcohort.__version__} from {source}, resources {resources_dir()}")
PY
