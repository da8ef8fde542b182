"""Attention and rotary-embedding math: the parts of the method that touch tensors."""
