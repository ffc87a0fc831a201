"""Sweeps: Ray Tune over the contrastive knobs, and the sweep's report."""
