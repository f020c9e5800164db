"""The trainer: its options (one module per concern), the loop, loss, optimizers, saving and trackers."""
