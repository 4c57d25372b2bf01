"""Evaluation harness: datasets, metrics, editing methods and baselines, reports."""
