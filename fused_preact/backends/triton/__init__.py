"""Triton kernels and their launchers (backend.py: the limits and the op table), imported when
the triton backend is first used."""
