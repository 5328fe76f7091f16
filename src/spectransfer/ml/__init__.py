"""The network: model, streaming dataset, training and scoring."""
