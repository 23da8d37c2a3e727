"""Fake of ``flashinfer.jit`` (package marker)."""
