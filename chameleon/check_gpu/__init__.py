"""GPU readiness check (SPEC §8): `python -m chameleon.check_gpu [--dry-run] [--json OUT] [--quick]`."""
