"""Logging for workflow scripts: everything, tracebacks included, goes to the rule's log file."""

import logging
import sys


def log_to(path: str) -> None:
    stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the script
    sys.stderr = stream
    logging.basicConfig(
        stream=stream, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
