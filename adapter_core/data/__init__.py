"""The data both training and evaluation are made of: the one conversation format, synthetic
personas, generic text, and conversations as JSONL files.

Training and evaluation import this package; it imports neither of them.
"""
