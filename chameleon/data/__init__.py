"""Package data shipped with Chameleon.

`traces/` holds the Azure LLM inference trace 2023 (the Splitwise trace; conversation and code),
CC-BY 4.0, from the Azure Public Dataset (Patel et al., "Splitwise", ISCA 2024); see
`traces/README.md`. Read them through `chameleon.harness.traces.load_trace`, which finds them with
`importlib.resources`, so they work from a source tree and from an installed wheel alike.
"""
