"""One device-memory budget: KV blocks, the adapter cache and the arrival predictor (no torch)."""
