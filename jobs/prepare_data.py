"""Prepare stage only: URL list → download → filter → tokenize → RUN/data (shards, rejects, stats)."""

from common import add_data_args, base_parser, init_ray, main

from pipeline.pretrain import format_summary


def run(pipeline, args):
    init_ray(args.address)
    pipeline.prepare()
    print(format_summary(pipeline.summary()))


if __name__ == "__main__":
    parser = base_parser(__doc__)
    add_data_args(parser)
    main(run, parser)
