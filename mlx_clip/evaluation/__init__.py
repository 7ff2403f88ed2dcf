"""Evaluation: zero-shot, retrieval and linear probe with CLIP_benchmark's definitions, and their reports."""
