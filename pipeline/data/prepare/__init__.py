"""Prepare: URL list → download → filter → tokenize → Parquet shards, rejects and stats.

inputs.py reads URL lists; run.py composes the Ray Data stages and the driver's checks;
chunks.py makes each shard a unit of resume; funnel.py reports what happened.
"""

from pipeline.data.prepare.funnel import STAGES, format_funnel
from pipeline.data.prepare.inputs import READERS, read_url_list
from pipeline.data.prepare.run import is_transient, run_prepare

__all__ = ["READERS", "STAGES", "format_funnel", "is_transient", "read_url_list", "run_prepare"]
