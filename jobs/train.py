"""Train stage only: RUN/data/shards → Ray Train (TorchTrainer) → RUN/train, exported to RUN/model."""

from common import base_parser, init_ray, main

from pipeline.pretrain import format_summary


def run(pipeline, args):
    init_ray(args.address)
    pipeline.train()
    print(format_summary(pipeline.summary()))


if __name__ == "__main__":
    main(run, base_parser(__doc__))
