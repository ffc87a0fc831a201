"""Sweep stage: Ray Tune over temperature, batch size and lr on a prepared run directory.

Trials share RUN/data/shards; the scheduler stops the weak ones early on zero-shot top-1 on a
small held-out folder. The best trial is exported to RUN/model and evaluated; RUN/sweep holds
report.html, TensorBoard hparams and the leaderboard. Rerun the same command to resume a
sweep whose driver died.

python jobs/sweep.py --preset demo --run-dir runs/demo
python jobs/sweep.py --show runs/demo           # the leaderboard, without Ray

Each axis sets one training field for every trial (--temperatures: train.init_temperature,
--batch-sizes: train.global_batch_size, ...); a flag naming such a field is refused. Every other
training flag (--warmup-steps, --zeroshot-every-steps, --num-workers, ...) applies to every trial.
"""

from __future__ import annotations

from common import ERRORS, STARTED, fail, job_parser, run_spec, set_log_level, spec_from_args


def _leaderboard(spec, run) -> None:
    from pipeline.tune.report import format_leaderboard, read_sweep

    _, trials = read_sweep(run.sweep)
    print(format_leaderboard(trials, run.sweep))


def main() -> None:
    parser = job_parser(__doc__, ("sweep", "train", "eval"), inputs=("val_dataset", "eval_dataset"))
    parser.add_argument(
        "--show", metavar="RUN", default=None, help="print RUN's sweep leaderboard and exit"
    )
    args = parser.parse_args()
    set_log_level(args.log_level)
    from pipeline.rundir import RunDir

    try:
        if args.show is not None:
            _leaderboard(None, RunDir.at(args.show))
            return
        spec = spec_from_args(parser, args, ("train", "evaluate"), sweep=True)
        run_spec(spec, args.address, after=None if args.dry_run else _leaderboard, started=STARTED)
    except ERRORS as err:
        fail(err)


if __name__ == "__main__":
    main()
