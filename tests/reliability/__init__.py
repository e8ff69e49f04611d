"""Reliability tests: crash, faults, poison, injection, secrets and shutdown."""
