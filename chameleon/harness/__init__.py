"""Experiments: workloads, traces, metrics, the open-loop driver, `bench` and `calibrate`."""
