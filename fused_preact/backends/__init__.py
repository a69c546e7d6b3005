"""The backends, each a module exposing BACKEND (a base.Backend with its op table):

    base        Backend, BackendNotSupported and the host helpers every backend shares (a leaf)
    reference   every op in plain PyTorch: the CPU backend, the test oracle, convert's probe
    triton/     Triton kernels and their launchers (compiled on GPUs, interpreted on the CPU)
    cuda        the Python side of the hand-written kernels in csrc/ (fused_preact._C)

Imports run one way: dispatch -> backends -> base; no backend imports dispatch.
"""
