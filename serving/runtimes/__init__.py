"""Runtimes: one small class per backend behind one protocol."""
