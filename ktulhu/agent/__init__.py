"""The `ktulhu agent` command: local automation on the same model."""
