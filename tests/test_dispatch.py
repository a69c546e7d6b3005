"""Backend choice: explicit argument > use_backend() > FUSED_PREACT_BACKEND > auto; reasons."""
import pytest
import torch

import fused_preact as fp
from fused_preact import dispatch


def test_auto_on_cpu_without_interpreter_is_reference(monkeypatch):
    monkeypatch.setenv("FUSED_PREACT_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 3, 4, 4)
    assert dispatch.select("bn_relu_conv", [x]).name == "reference"


def test_cuda_backend_declines_on_cpu_with_reason():
    reasons = dispatch.get_backend("cuda").not_supported_reasons("bn_relu_conv", [torch.randn(2)])
    assert reasons and all(r.startswith("cuda: ") for r in reasons)
    if not torch.cuda.is_available():
        assert any("CUDA" in r or "not built" in r for r in reasons)


def test_forcing_a_declining_backend_lists_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(fp.BackendNotSupported, match=r"backend 'cuda' was requested.*\n  cuda: "):
        dispatch.select("bn_relu_conv", [x], "cuda")
    with pytest.raises(fp.BackendNotSupported, match="cpu tensors need TRITON_INTERPRET=1"):
        dispatch.select("bn_relu_conv", [x], "triton")


def test_dtype_reason_names_the_dtype(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    reasons = dispatch.get_backend("triton").not_supported_reasons("bn_relu_conv", [x])
    assert any("dtype torch.float64 not supported" in r for r in reasons)


def test_precedence(monkeypatch):
    monkeypatch.setenv("FUSED_PREACT_BACKEND", "cuda")
    assert dispatch.requested_backend() == "cuda"
    with fp.use_backend("reference"):
        assert dispatch.requested_backend() == "reference"
        assert dispatch.requested_backend("triton") == "triton"
    assert dispatch.requested_backend() == "cuda"


def test_module_backend_argument_is_used(monkeypatch):
    monkeypatch.setenv("FUSED_PREACT_BACKEND", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    block = fp.PreActBlock(4, 4, backend="cuda")
    with pytest.raises(fp.BackendNotSupported, match="backend 'cuda' was requested"):
        block(torch.randn(2, 4, 5, 5))


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        fp.PreActBlock(4, 4, backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        with fp.use_backend("fast"):
            pass


def test_info_runs(capsys):
    from fused_preact import info
    info.main()
    out = capsys.readouterr().out
    assert "reference: usable" in out and "_C built" in out
