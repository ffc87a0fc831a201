"""Train stage only: RUN/data/shards → Ray Train → RUN/train, exported to RUN/model."""

from common import run_job

if __name__ == "__main__":
    run_job(__doc__, stages=("train",), sections=("train",), inputs=("val_dataset",))
