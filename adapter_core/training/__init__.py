"""Teaching the generator to store: the objectives' batches and the training loop (the data is in
adapter_core.data)."""
