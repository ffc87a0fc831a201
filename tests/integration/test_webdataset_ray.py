"""WebDataset at the storage boundary on a local Ray: shards exported as tars by Ray tasks,
then `jobs/train.py --shards TARS`'s path: the train stage imports the tars with Ray Data's
read_webdataset (tokens recomputed) and trains on them to an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline import pretrain
from pipeline.data.webdataset import IMPORT_MARKER, export_webdataset, import_shards
from pipeline.rundir import RunDir
from pipeline.spec import Inputs, build_spec, validate
from tests.unit.test_webdataset import write_shard

pytestmark = pytest.mark.integration


def test_export_tars_then_train_from_them(ray_local, tmp_path):
    source = tmp_path / "prepared" / "data" / "shards"
    tables = [write_shard(source / f"part-{i:05d}.parquet", 40, first=40 * i) for i in range(2)]
    original = pa.concat_tables(tables).sort_by("key")

    tars = tmp_path / "wds"
    written = export_webdataset(source, str(tars))
    assert written == {str(tars / "part-00000.tar"): 40, str(tars / "part-00001.tar"): 40}
    samples = list(wds.WebDataset(sorted(map(str, tars.glob("*.tar"))), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == original.column("key").to_pylist()

    flags = {
        "train.num_workers": (1, "--num-workers"),
        "train.global_batch_size": (16, "--global-batch-size"),
        "train.max_steps": (3, "--max-steps"),
        "train.zeroshot_every_steps": (0, "--zeroshot-every-steps"),
    }
    spec = build_spec(
        preset="tiny",
        run_dir=str(tmp_path / "run"),
        stages=("train",),
        flags=flags,
        inputs=Inputs(shards=str(tars)),
    )
    spec = validate(spec)
    run = RunDir.at(spec.run_dir)
    Path(run.root).mkdir(parents=True)
    metrics = pretrain.train(spec, run, log=print)

    # The imported shards are the exported rows, tokens and all.
    imported = pq.read_table(sorted(Path(run.shards).glob("*.parquet"))).sort_by("key")
    assert imported.schema.equals(original.schema)
    assert imported.to_pylist() == original.to_pylist()
    assert json.loads((Path(run.shards) / IMPORT_MARKER).read_text())["rows"] == 80
    # Trained on them and exported a model open_clip can load.
    assert metrics["step"] == 3
    assert run.stage("train")["identity"]["inputs"]["shards"] is not None
    assert (Path(run.model) / "open_clip_config.json").exists()

    # A rerun finds the import whole and leaves the shards alone.
    before = {p.name: p.stat().st_mtime_ns for p in Path(run.shards).iterdir()}
    assert import_shards(str(tars), run.shards, spec.config.train.model) == 80
    assert {p.name: p.stat().st_mtime_ns for p in Path(run.shards).iterdir()} == before
