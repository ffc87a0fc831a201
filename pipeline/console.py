"""How much of Ray's own logging reaches the console (the jobs' --log-level).

Ray Data and Ray Train configure their loggers themselves (everything to their log files under
the Ray session, INFO and up to the console); only the console side follows the level asked
for, so nothing is lost from the files. Called by the jobs on the driver and by the training
loop on each worker, where Ray Data runs too.
"""

from __future__ import annotations

import logging
import os

# Ray Data warnings about its own sizing, not the user's business: the pipeline disables the
# progress bars on purpose, and sizes its actor pools below what the cluster could start
# (the "may hang forever unless the cluster scales up" notice); shown at info and debug.
INTERNAL_WARNINGS = ("Progress bars disabled", "may hang forever")
LEVEL_ENV = "RAY_LOGGER_LEVEL"  # also read by the Ray processes a local cluster starts
DEFAULT = "warning"


def level() -> str:
    return os.environ.get(LEVEL_ENV, DEFAULT)


def set_ray_console_level(name: str) -> None:
    os.environ[LEVEL_ENV] = name
    for logger in ("ray", "ray.train", "ray.tune"):
        logging.getLogger(logger).setLevel(name.upper())
    import ray.data  # noqa: F401  (configures its logger on import: adjust it after)

    for handler in logging.getLogger("ray.data").handlers:
        if "File" not in type(handler).__name__:  # its SessionFileHandler keeps everything
            handler.setLevel(name.upper())
            for f in [f for f in handler.filters if isinstance(f, _Internal)]:
                handler.removeFilter(f)
            if name in ("warning", "error"):
                handler.addFilter(_Internal())


class _Internal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in INTERNAL_WARNINGS)
