"""Chameleon's quota-based multi-level queue: sizing, clustering, quotas, the policy."""
