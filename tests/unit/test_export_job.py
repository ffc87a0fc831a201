"""jobs/export.py: RUN/model in a bucket (written there by the export that training does) is
copied to a local folder that open_clip loads as `local-dir:` (issue 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import open_clip
import torch

from pipeline import storage
from pipeline.train.modeling import create_model, export_local_dir, model_config

ROOT = Path(__file__).resolve().parents[2]


def _export(run_dir: str, to: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "export.py"), "--run-dir", run_dir, "--to", str(to)],
        cwd=cwd, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_a_model_in_a_bucket_is_copied_and_loads_with_open_clip(bucket, tmp_path):
    torch.manual_seed(0)
    model = create_model("clip-demo-tiny", 0.07)
    export_local_dir(model, model_config("clip-demo-tiny"), f"{bucket}/run/model")
    storage.write_json(f"{bucket}/run/model/run_card.json", {"stage": "train"})
    assert not Path("s3:").exists()
    proc = _export(f"{bucket}/run", tmp_path / "out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    assert storage.read_json(str(tmp_path / "out" / "run_card.json")) == {"stage": "train"}


def test_a_run_without_a_model_is_one_error_line(bucket, tmp_path):
    storage.write_json(f"{bucket}/run/manifest.json", {"stages": {}})
    proc = _export(f"{bucket}/run", tmp_path / "out", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bucket}/run/model: no exported model (run jobs/train.py first)"
    ]
    assert not (tmp_path / "out").exists()
