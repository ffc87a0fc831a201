"""The whole path: (demo corpus →) prepare → train → export → zero-shot eval → summary.

    python jobs/pretrain.py                      # built-in demo on this machine
    ray job submit --working-dir . -- python jobs/pretrain.py --preset tiny
"""

from common import add_data_args, add_eval_args, base_parser, init_ray, main

from pipeline.pretrain import format_summary


def run(pipeline, args):
    init_ray(args.address)
    pipeline.prepare()
    pipeline.train()
    pipeline.evaluate()
    print(format_summary(pipeline.summary()))


if __name__ == "__main__":
    parser = base_parser(__doc__)
    add_data_args(parser)
    add_eval_args(parser)
    main(run, parser)
