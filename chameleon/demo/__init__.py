"""The adapter demo: three tiny style datasets, a LoRA trainer for SmolLM2, and a side-by-side run."""
