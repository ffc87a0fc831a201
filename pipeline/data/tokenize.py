"""The open_clip tokenizer of the configured model as a Ray Data stage."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import TokenizeConfig, from_dict


def load_tokenizer(model: str):
    """The tokenizer open_clip pairs with `model` (BPE, context length from its config).

    open_clip (and torch with it) is imported here, in the tokenizer actor, not in the
    driver that builds the Ray Data pipeline: seconds saved before the first download.
    """
    import open_clip

    from pipeline.train.modeling import resolve_model_name

    return open_clip.get_tokenizer(resolve_model_name(model))


class TokenizeStage:
    """Adds `tokens` (int32, the model's context length) to the rows still alive."""

    def __init__(self, config: dict[str, Any]):
        self.tokenizer = load_tokenizer(from_dict(TokenizeConfig, config).model)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        start = time.perf_counter()
        batch = batch.copy()
        alive = batch["reason"].isna().to_numpy()
        tokens: list[list[int] | None] = [None] * len(batch)
        if alive.any():
            captions = [str(c) for c in batch.loc[alive, "caption"]]
            encoded = self.tokenizer(captions).numpy().astype(np.int32)
            for row, vector in zip(np.flatnonzero(alive), encoded, strict=True):
                tokens[row] = vector.tolist()
        batch["tokens"] = tokens
        batch["tokenize_seconds"] = (time.perf_counter() - start) / max(1, len(batch))
        return batch
