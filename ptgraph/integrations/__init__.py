"""Thin adapters from PruneTrain to the training stacks people already use (each imports its framework lazily)."""
