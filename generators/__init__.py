"""Scenes from identity handles: the SDXL composition pipeline, its identity methods,
layouts, regional attention, LoRAs and signed provenance (above ``encoders``)."""
