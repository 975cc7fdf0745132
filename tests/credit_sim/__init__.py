"""Deterministic simulation of the credit-control protocol (relays, quota, the usage stream, faults)."""
