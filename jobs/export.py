"""Copy a run's exported model (RUN/model, local or in a bucket) to a local folder.

    python jobs/export.py --run-dir s3://bucket/run --to ./model
    open_clip.create_model_and_transforms("local-dir:./model")

The folder gets open_clip_config.json, the weights and run_card.json, each copied whole.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import fail

from pipeline import storage


def export(run_dir: str, to: str) -> str:
    """Copy RUN/model to the local folder `to`; ValueError / StorageError name what is wrong."""
    if storage.is_uri(to):
        raise ValueError(f"--to {to}: name a local folder (open_clip loads only local ones)")
    model = storage.join(storage.normalize(run_dir), "model")
    config = storage.join(model, "open_clip_config.json")
    storage.check_readable(storage.normalize(run_dir))
    if not storage.exists(config) or not storage.list_files(model, ".safetensors"):
        raise FileNotFoundError(f"{model}: no exported model (run jobs/train.py first)")
    to = os.path.abspath(os.path.expanduser(to))
    if os.path.isfile(to):
        raise ValueError(f"--to {to} is a file; name a folder")
    os.makedirs(to, exist_ok=True)
    # The config last: a folder holding it holds the weights too, even after an interruption.
    names = sorted(
        storage.list_files(model), key=lambda f: storage.name(f) == "open_clip_config.json"
    )
    for src in names:
        storage.write_bytes(os.path.join(to, storage.name(src)), storage.read_bytes(src))
    return to


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the run directory (a path or s3://, gs://)")
    p.add_argument("--to", required=True, help="local folder to copy RUN/model into")
    args = p.parse_args()
    try:
        to = export(args.run_dir, args.to)
    except (ValueError, FileNotFoundError, storage.StorageError) as err:
        fail(err)
    print(
        f"model copied to {to}; open_clip loads it: create_model_and_transforms('local-dir:{to}')"
    )


if __name__ == "__main__":
    sys.exit(main())
