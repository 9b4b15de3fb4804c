"""Teaching the generator to store: training data, objectives and the training loop."""
