"""Measuring what adapters remember: the JSONL conversation format, metrics and the runner."""
