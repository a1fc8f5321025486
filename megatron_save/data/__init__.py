"""Datasets (local json / jsonl / parquet through `datasets`, or hub names), chat templates, batching."""
