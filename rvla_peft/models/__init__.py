"""Native implementations of models that current transformers does not ship (importing one registers it with the
Auto classes)."""
