"""Simulated acquirer hosts and PoS terminals for tests, the bench and the default run."""
