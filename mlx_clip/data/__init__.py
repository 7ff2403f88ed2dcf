"""Datasets for fine-tuning and evaluation: records, class folders, batching, the built-in demo."""
