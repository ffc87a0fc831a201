"""The prepared shards as WebDataset tars: RUN/data/shards/NAME.parquet -> DEST/NAME.tar.

Each sample is KEY.jpg, KEY.txt (the caption) and KEY.json (url, sizes, sha256, ...), the
layout img2dataset writes and open_clip's trainer reads:
    python jobs/export_wds.py --run-dir runs/demo --to /data/wds       # or s3://BUCKET/wds
    python -m open_clip_train.main --dataset-type webdataset \\
        --train-data '/data/wds/part-{00000..00007}.tar' --train-num-samples N ...
Training here reads such tars too: jobs/train.py --shards DEST.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from common import ERRORS, fail, init_ray, set_log_level

from pipeline.data.webdataset import export_plan, export_webdataset
from pipeline.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", required=True, help="run directory holding data/shards")
    parser.add_argument("--to", required=True, help="folder for the tars: a path or fsspec URL")
    parser.add_argument("--address", default=None, help="Ray cluster address")
    args = parser.parse_args()
    set_log_level("warning")
    try:
        shards = RunDir.at(args.run_dir).shards
        dest = args.to if "://" in args.to else str(Path(args.to).expanduser().resolve())
        plan = export_plan(shards, dest)  # no shards: an error before Ray starts
        init_ray(args.address)
        written = export_webdataset(shards, dest)
    except ERRORS as err:
        fail(err)
    print(f"{sum(written.values())} samples in {len(plan)} tars under {dest}")
    numbers = [int(m[1]) for p in plan if (m := re.fullmatch(r"part-(\d{5})", Path(p["tar"]).stem))]
    if numbers and numbers == list(range(numbers[0], numbers[0] + len(plan))):  # braceexpand's form
        span = f"{{{numbers[0]:05d}..{numbers[-1]:05d}}}"
        print(f"open_clip: --dataset-type webdataset --train-data '{dest}/part-{span}.tar'")


if __name__ == "__main__":
    sys.exit(main())
