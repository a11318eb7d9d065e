"""The terminal side of a training run: following it as it happens, and the summary it ends with."""
