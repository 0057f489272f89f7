"""Integrations with training frameworks (PyTorch Lightning). Imported on demand."""
