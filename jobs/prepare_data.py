"""Prepare stage only: URL list → download → filter → tokenize → RUN/data."""

from common import run_job

if __name__ == "__main__":
    run_job(__doc__, stages=("prepare",), sections=("prepare", "demo"), inputs=("url_list",))
