"""Train stage only: RUN/data/shards → Ray Train → RUN/train, exported to RUN/model.

python jobs/train.py --run-dir RUN                      # the shards prepare wrote
python jobs/train.py --run-dir RUN --shards s3://BUCKET/wds/   # WebDataset tars (or Parquet)
"""

from common import run_job

if __name__ == "__main__":
    run_job(__doc__, stages=("train",), sections=("train",), inputs=("val_dataset", "shards"))
