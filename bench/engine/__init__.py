"""Engine benchmark: our batching engine vs llama-server vs the original's design, side by side."""
