"""Triton kernels and their launchers, imported when the triton backend is first used."""
