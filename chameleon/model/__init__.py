"""Llama-family decoders in plain torch over a paged KV cache."""
