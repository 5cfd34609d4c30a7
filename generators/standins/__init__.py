"""Offline stand-ins for generation: tiny SDXL / SD1.5 pipelines and identity checkpoints
that fit them, and the full-size SDXL architecture with random weights (timing only)."""
