"""Serving: everything that runs an artefact — runtimes, benchmark harness, parity, reports."""
