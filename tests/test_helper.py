"""Building blocks against direct computations of what the reference computes."""
import torch
import torch.nn.functional as F

from helper import AttnBlock, Downsample, ResnetBlock, Upsample


def test_attention_equals_explicit_softmax(float64):
    torch.manual_seed(0)
    block = AttnBlock(in_channels=32).eval()
    x = torch.randn(2, 32, 5, 7)
    b, c, h, w = x.shape
    hn = block.norm(x)
    q = block.q(hn).reshape(b, c, h * w).permute(0, 2, 1)  # (B, HW, C)
    k = block.k(hn).reshape(b, c, h * w)  # (B, C, HW)
    v = block.v(hn).reshape(b, c, h * w)
    attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # (B, HW_q, HW_k)
    out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)
    expected = x + block.proj_out(out)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


def test_downsample_pads_right_and_bottom_only(float64):
    torch.manual_seed(0)
    down = Downsample(in_channels=4)
    x = torch.randn(1, 4, 8, 6)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert down(x).shape == (1, 4, 4, 3)
    torch.testing.assert_close(down(x), expected, rtol=1e-12, atol=1e-12)


def test_upsample_and_resnet_shapes():
    x = torch.randn(2, 32, 4, 4)
    assert Upsample(in_channels=32)(x).shape == (2, 32, 8, 8)
    block = ResnetBlock(in_channels=32, out_channels=64)
    assert block(x).shape == (2, 64, 4, 4)
    assert hasattr(block, "nin_shortcut")
    assert not hasattr(ResnetBlock(in_channels=32, out_channels=32), "nin_shortcut")
