"""Eval stage only: RUN/model → zero-shot top-1/top-5 (and retrieval) → RUN/eval/results.json."""

from common import add_eval_args, base_parser, init_ray, main

from pipeline.pretrain import format_summary


def run(pipeline, args):
    init_ray(args.address)
    pipeline.evaluate()
    print(format_summary(pipeline.summary()))


if __name__ == "__main__":
    parser = base_parser(__doc__)
    add_eval_args(parser)
    main(run, parser)
