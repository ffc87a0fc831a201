"""Eval stage only: RUN/model → zero-shot top-1/top-5 (and retrieval) → RUN/eval/results.json."""

from common import run_job

if __name__ == "__main__":
    run_job(__doc__, stages=("evaluate",), data=False, eval_set=True)
