"""Measuring what adapters remember: answer metrics and the runner (the data is in adapter_core.data)."""
