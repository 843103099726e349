"""covspec.export: turns HF checkpoints into device and edge bundles (not built yet)."""
