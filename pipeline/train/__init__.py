"""Training: streaming ingest, the contrastive step, open_clip models, the TorchTrainer loop."""
