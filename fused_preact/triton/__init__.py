"""Triton kernels and their launchers. Imported lazily: `import fused_preact` never imports triton."""
