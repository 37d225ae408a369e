"""Methods: one LightningModule per family, sharing optimizer, schedule and metric helpers."""
