"""The cuda backend's Python side, without launching: marshalling into the torch-free
params structs, argument checks naming the argument, declared limits and reasons."""
import pytest
import torch

from fused_preact.backends import cuda
from fused_preact.backends.base import wgrad_splits

ext, why_not_built = cuda.load_extension()
needs_ext = pytest.mark.skipif(ext is None, reason=f"fused_preact._C not built: {why_not_built}")


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_act_describes_any_layout(layout):
    t = torch.randn(2, 3, 5, 7)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        t = t.transpose(2, 3).contiguous().transpose(2, 3)
    a = cuda.act(ext, t)
    assert (a.ptr, a.n, a.c, a.h, a.w) == (t.data_ptr(), 2, 3, 5, 7)
    assert (a.sn, a.sc, a.sh, a.sw) == t.stride()
    # The element at (n, c, h, w) is where the kernels' offset() computes it.
    flat = torch.as_strided(t, (t.untyped_storage().nbytes() // 4,), (1,), 0)
    assert flat[1 * a.sn + 2 * a.sc + 3 * a.sh + 4 * a.sw] == t[1, 2, 3, 4]


@pytest.mark.parametrize("dims", [(2, 3, 1, 0), (2, 3, 0, 1), (1, 2, 3, 0), (0, 2, 3, 1)])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                    (torch.float32, torch.bfloat16)], ids=["bf16", "fp32", "fp32-as-bf16"])
def test_packed_weight_holds_the_permuted_weight_in_memory_order(dims, dtypes):
    """The kernels read a weight by its pointer alone: its memory must be the permuted layout,
    also when no cast is needed (a permuted view there wrote wrong convs, seen on an H100)."""
    weight_dtype, conv_dtype = dtypes
    w = torch.randn(8, 5, 3, 3).to(weight_dtype)
    packed = cuda.packed_weight(w, dims, conv_dtype)
    assert packed.dtype == conv_dtype and packed.is_contiguous()
    assert packed.data_ptr() != w.data_ptr()
    flat = torch.as_strided(packed, (packed.numel(),), (1,))  # what a pointer-only kernel reads
    assert torch.equal(flat, w.permute(*dims).to(conv_dtype).reshape(-1))


@needs_ext
def test_dtype_codes_and_errors():
    assert cuda.dtype_code(ext, torch.bfloat16) == ext.DType.bf16
    with pytest.raises(TypeError, match="dtype torch.float64 not supported"):
        cuda.dtype_code(ext, torch.float64)


@needs_ext
def test_wrappers_reject_cpu_tensors_before_launch():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cuda.bn_relu_conv(x, None, None, None, None, w, None, [1, 1], [1, 1], 1e-5, False, None, None, None, None,
                          w.dtype)
    with pytest.raises(ValueError, match="dy must be a CUDA tensor"):
        cuda.bn_relu_conv_dgrad(torch.randn(2, 6, 5, 5), w, x, None, None, None, None, [1, 1], [1, 1], 1e-5,
                                torch.float32)
    with pytest.raises(ValueError, match="partials must be a CUDA tensor"):
        cuda.bn_finalize(torch.zeros(1, 3, 4), None, None, None, 0.1)
    with pytest.raises(ValueError, match="mean must be a CUDA tensor"):
        cuda.bn_args(ext, torch.zeros(4), torch.ones(4), None, None, 1e-5, 4, [])


@needs_ext
def test_dgrad_params_carry_g_other():
    """The gradient dgrad adds before its ReLU mask (a projection's): none unless set."""
    p = ext.ConvDgradParams()
    assert p.g_other.ptr == 0
    t = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    p.g_other = cuda.act(ext, t)
    assert (p.g_other.ptr, p.g_other.n, p.g_other.c, p.g_other.sc, p.g_other.sw) == (t.data_ptr(), 2, 3, 1, 3)


def test_tf32_limit_is_declared():
    w = torch.randn(6, 4, 3, 3)
    previous = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        assert "allow_tf32" in cuda.tf32_reason(w.dtype)
        assert cuda.tf32_reason(torch.float16) is None  # autocast: fp32 x, fp16 conv
        assert cuda.tf32_reason(None) is None  # ops without a convolution
        torch.backends.cudnn.allow_tf32 = True
        assert cuda.tf32_reason(w.dtype) is None
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def test_wgrad_split_heuristic():
    assert wgrad_splits(100, 4) == 1              # few pixels: no split
    assert wgrad_splits(128 * 32 * 32, 9) == 64   # many pixels, few output blocks: capped
    assert wgrad_splits(64 * 7 * 7, 2048) == 1    # enough output blocks already


def test_sm80_kernels_only_where_asked_for_and_their_layout_holds(monkeypatch):
    """The CuTe kernels run only with their flag, for fp16 / bf16 / fp32 (tf32) convs, on
    gathered operands in channels_last with channels a multiple of a 16-byte vector (8
    elements, 4 in fp32), all checked before any device query."""
    x = torch.randn(2, 16, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    monkeypatch.delenv(cuda.SM80_FLAG, raising=False)
    assert not cuda.sm80_kernel_runs(torch.bfloat16, (x,))
    monkeypatch.setenv(cuda.SM80_FLAG, "1")
    assert not cuda.sm80_kernel_runs(torch.float64, (x.double(),))  # no float64 kernel
    assert not cuda.sm80_kernel_runs(torch.bfloat16, (x.contiguous(),))  # NCHW: channel stride 25
    assert not cuda.sm80_kernel_runs(torch.bfloat16, (x[:, :12],))  # 12 channels: not whole vectors of 8
    assert not cuda.sm80_kernel_runs(torch.float32, (x.float()[:, :6],))  # 6 channels: not whole vectors of 4
    assert not cuda.sm80_kernel_runs(torch.float16, (x,))  # x of another dtype than the conv

