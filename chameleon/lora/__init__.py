"""Batched multi-LoRA: adapter pools and segment-grouped shrink/expand kernels."""
