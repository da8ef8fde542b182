"""The stepping engine: forward passes over the shared cache, raw generation, and solving."""
