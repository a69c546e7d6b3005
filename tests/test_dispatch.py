"""Backend choice: explicit argument > use_backend() > FUSED_PREACT_BACKEND > auto; reasons."""
import os
import subprocess
import sys

import pytest
import torch

import fused_preact as fp
from fused_preact import dispatch
from fused_preact.backends.base import Backend


def run_without_interpreter(code: str) -> str:
    """Run `code` in a fresh process without TRITON_INTERPRET (the mode is fixed at import)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_PREACT_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_interpreter_cpu_goes_to_reference_and_triton_says_why():
    out = run_without_interpreter(
        "import torch, fused_preact as fp\n"
        "from fused_preact import dispatch\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "print(dispatch.select('bn_relu_conv', [x]).name)\n"
        "try:\n"
        "    dispatch.select('bn_relu_conv', [x], 'triton')\n"
        "except fp.BackendNotSupported as e:\n"
        "    print(e)\n")
    assert out.startswith("reference\n")
    assert "triton: cpu tensors need TRITON_INTERPRET=1" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the tests run Triton compiled, not interpreted")
def test_auto_under_interpreter_picks_triton(monkeypatch):
    monkeypatch.setenv("FUSED_PREACT_BACKEND", "auto")
    assert dispatch.select("bn_relu_conv", [torch.randn(2, 3, 4, 4)]).name == "triton"


def test_cuda_backend_declines_on_cpu_with_reason():
    reasons = dispatch.get_backend("cuda").not_supported_reasons("bn_relu_conv", [torch.randn(2)])
    assert reasons and all(r.startswith("cuda: ") for r in reasons)
    if not torch.cuda.is_available():
        assert any("CUDA" in r or "not built" in r for r in reasons)


def test_triton_declines_exact_float32_gpu_convolutions_unless_asked(monkeypatch):
    """Exact float32 conv kernels failed verification on a GPU: declined there with the ways
    out named; tf32, low precision, other ops and the interpreter (CPU) are unaffected."""
    from fused_preact.backends.triton.backend import FP32_GPU_FLAG, fp32_gpu_reason
    monkeypatch.delenv(FP32_GPU_FLAG, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    why = fp32_gpu_reason(torch.float32, "cuda")
    assert "exact float32" in why and "allow_tf32" in why and "autocast" in why and FP32_GPU_FLAG in why
    assert fp32_gpu_reason(torch.bfloat16, "cuda") is None
    assert fp32_gpu_reason(torch.float32, "cpu") is None
    assert fp32_gpu_reason(None, "cuda") is None  # ops without a convolution
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert fp32_gpu_reason(torch.float32, "cuda") is None
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setenv(FP32_GPU_FLAG, "1")
    assert fp32_gpu_reason(torch.float32, "cuda") is None


PRECISION_KEYS = [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul")]


@pytest.fixture
def fp32_precision_api():
    """torch >= 2.9's float32 precision per backend and op (torch.backends.*.fp32_precision),
    put back afterwards as conftest left it (the legacy flags, all else inheriting)."""
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch < 2.9 has only torch.backends.cudnn.allow_tf32")
    getter = torch._C._get_fp32_precision_getter
    before = {key: getter(*key) for key in PRECISION_KEYS}
    legacy = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.fp32_precision = torch.backends.cudnn.fp32_precision = "none"
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy
    assert {key: getter(*key) for key in PRECISION_KEYS} == before


def set_fp32_precision(setting: str) -> None:
    """'cudnn.conv=ieee': torch.backends.cudnn.conv.fp32_precision = 'ieee' ('backends=...': the
    global one); 'allow_tf32=True': the legacy torch.backends.cudnn.allow_tf32."""
    where, value = setting.split("=")
    if where == "allow_tf32":
        torch.backends.cudnn.allow_tf32 = value == "True"
        return
    module = torch
    for name in ("backends." + where).split(".")[1 if where == "backends" else 0:]:
        module = getattr(module, name)
    module.fp32_precision = value


# Settings from conftest's state (allow_tf32 False: every level inherits, down to none) -> whether
# nn.Conv2d may use tf32, as PyTorch's notes on fp32_precision define it: an op's own setting
# wins, "none" inherits from the backend's, then from the global one; rnn and matmul are other ops.
TF32_SETTINGS = [
    (["allow_tf32=True"], True),
    (["allow_tf32=True", "cudnn.conv=ieee"], False),  # PyTorch's default, then the new API
    (["backends=tf32"], True), (["backends=ieee"], False),
    (["cudnn=tf32"], True), (["cudnn=ieee"], False),
    (["cudnn.conv=tf32"], True), (["cudnn.conv=ieee"], False),
    (["cudnn=tf32", "cudnn.conv=ieee"], False),
    (["backends=ieee", "cudnn.conv=tf32"], True),
    (["cudnn.conv=tf32", "cudnn.rnn=ieee"], True),
    (["cuda.matmul=tf32"], False),
]


@pytest.mark.parametrize("settings,tf32", TF32_SETTINGS, ids=["+".join(s) for s, _ in TF32_SETTINGS])
def test_tf32_for_convolutions_set_either_way_is_read_as_pytorch_reads_it(settings, tf32, fp32_precision_api,
                                                                        monkeypatch):
    """Whichever of torch's APIs turns tf32 on or off for convolutions, the backends read what
    nn.Conv2d uses; and a block runs (reading the legacy torch.backends.cudnn.allow_tf32 raises
    in most of these states, and did inside every fused call)."""
    from fused_preact.backends import cuda
    from fused_preact.backends.base import tf32_convolutions
    from fused_preact.backends.triton.backend import FP32_GPU_FLAG, fp32_gpu_reason
    from fused_preact.testing import PreActBlock as EagerBlock
    from fused_preact.testing import randomize_bn
    from helpers import assert_close
    monkeypatch.delenv(FP32_GPU_FLAG, raising=False)
    for setting in settings:
        set_fp32_precision(setting)
    assert tf32_convolutions() == tf32
    assert (fp32_gpu_reason(torch.float32, "cuda") is None) == tf32  # triton: exact float32 declined on GPUs
    assert (cuda.tf32_reason(torch.float32) is None) == tf32  # cuda: float32 runs as tf32 only
    eager = EagerBlock(4, 4, 1)
    randomize_bn(eager)
    ours = fp.PreActBlock(4, 4)
    ours.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4, 5, 5)
    outputs = []
    for block in (ours, eager):
        xg = x.clone().requires_grad_(True)
        out = block(xg)
        out.square().sum().backward()
        outputs.append((out, xg.grad))
    (out, dx), (ref, ref_dx) = outputs
    assert_close(out, ref, torch.float32, "output")
    assert_close(dx, ref_dx, torch.float32, "grad x")


def test_forcing_a_declining_backend_lists_reasons():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(fp.BackendNotSupported, match=r"backend 'cuda' was requested.*\n  cuda: "):
        dispatch.select("bn_relu_conv", [x], "cuda")


def test_dtype_reason_names_the_dtype():
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


class FlagBackend(Backend):
    """Stands in for the cuda backend: CPU tensors, and only with FAKE_FLAG=1 and tf32 allowed."""
    name = "cuda"
    dtypes = (torch.float32,)
    env_flags = ("FAKE_FLAG",)

    def __init__(self):
        super().__init__({"bn_relu_conv": None})

    def device_reason(self, device):
        return None if device.type == "cpu" else "cpu tensors only"

    def not_supported_reasons(self, op, tensors, conv_dtype=None):
        reasons = super().not_supported_reasons(op, tensors, conv_dtype)
        if os.environ.get("FAKE_FLAG") != "1" or not torch.backends.cudnn.allow_tf32:
            reasons.append("cuda: needs FAKE_FLAG=1 and tf32")
        return reasons


def test_remembered_choice_follows_flags_tf32_dtype_device_and_request(monkeypatch):
    """select() remembers its answers; each thing a reason may depend on changes the answer."""
    backends = {name: dispatch.get_backend(name) for name in dispatch.BACKEND_NAMES}
    monkeypatch.setattr(dispatch, "_loaded", {**backends, "cuda": FlagBackend()})
    monkeypatch.setattr(dispatch, "_env_flag_names", None)
    monkeypatch.setattr(dispatch, "_chosen", {})
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.delenv("FUSED_PREACT_BACKEND", raising=False)
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setenv("FAKE_FLAG", "1")
    assert dispatch.select("bn_relu_conv", [x]).name == "cuda"
    monkeypatch.setenv("FAKE_FLAG", "0")
    assert dispatch.select("bn_relu_conv", [x]).name != "cuda"
    monkeypatch.setenv("FAKE_FLAG", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert dispatch.select("bn_relu_conv", [x]).name != "cuda"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert dispatch.select("bn_relu_conv", [x.double()]).name == "reference"  # dtype
    assert dispatch.select("bn_relu_conv", [x], "reference").name == "reference"  # request
    assert dispatch.select("bn_relu_conv", [x, None]).name == "cuda"
    with pytest.raises(fp.BackendNotSupported, match="not implemented"):
        dispatch.select("bn_finalize", [x], "cuda")  # op; declines are raised every time
    with pytest.raises(fp.BackendNotSupported, match="not implemented"):
        dispatch.select("bn_finalize", [x], "cuda")
    assert dispatch.select("bn_relu_conv", [x.to("meta")]).name == "reference"  # device


def test_backward_runs_on_the_backend_that_ran_the_forward(monkeypatch):
    """Forward inside use_backend("reference"), backward outside it: still reference."""
    from fused_preact.backends import reference
    monkeypatch.setenv("FUSED_PREACT_BACKEND", "triton")
    calls = []
    for op in ("bn_relu_conv_dgrad", "bn_relu_conv_wgrad", "bn_backward_apply"):
        real = reference.BACKEND.impls[op]
        monkeypatch.setitem(reference.BACKEND.impls, op,
                            lambda _real=real, _op=op, **kw: calls.append(_op) or _real(**kw))
    block = fp.PreActBlock(4, 4)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with fp.use_backend("reference"):
        out = block(x)
    out.sum().backward()
    assert {"bn_relu_conv_dgrad", "bn_relu_conv_wgrad", "bn_backward_apply"} <= set(calls)


def test_bad_environment_variable_is_named_and_shown_by_info(monkeypatch, capsys):
    monkeypatch.setenv("FUSED_PREACT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable FUSED_PREACT_BACKEND must be one of"):
        fp.PreActBlock(4, 4)(torch.randn(2, 4, 5, 5))
    from fused_preact import info
    info.main()
    assert "FUSED_PREACT_BACKEND: 'bogus' INVALID" in capsys.readouterr().out


def test_float64_on_a_gpu_backend_points_to_reference():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(fp.BackendNotSupported, match="float64 runs on backend='reference'") as raised:
        fp.PreActBlock(4, 4, backend="triton").double()(x)
    assert "batch_stats" not in str(raised.value)  # no internal op names
