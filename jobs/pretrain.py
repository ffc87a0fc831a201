"""The whole path: (demo corpus →) prepare → train → export → zero-shot eval → summary.

python jobs/pretrain.py                      # the built-in demo on this machine
python jobs/pretrain.py --sweep              # a Tune sweep in place of the single training run
python jobs/pretrain.py --dry-run            # what it would do, without starting Ray
ray job submit --working-dir . -- python jobs/pretrain.py --preset tiny
"""

from common import run_job

if __name__ == "__main__":
    run_job(
        __doc__,
        stages=("prepare", "train", "evaluate"),
        sections=("train", "prepare", "eval", "sweep", "demo"),
        inputs=("url_list", "val_dataset", "eval_dataset"),
        sweep=True,
    )
