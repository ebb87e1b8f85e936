"""Convolution workarounds of the networks' one forward path: same parameters and numbers as nn.Conv2d,
computed faster (or without crashing) on the CPU. The plain computation of each is in ``reference``.

    >>> import torch
    >>> from epure.model.convolutions import UpsampleConv2d, channels_last
    >>> conv = UpsampleConv2d(8, 8)
    >>> conv(channels_last(torch.randn(2, 8, 4, 4))).shape  # conv3x3(nearest_upsample_2x(x))
    torch.Size([2, 8, 8, 8])

Each class keeps nn.Conv2d's ``weight`` and ``bias``, so checkpoints do not depend on how the convolution
runs. The gains in the docstrings were measured with ``python benchmarks/throughput.py`` and the
interleaved ablations of docs/performance.md (fp32, torch 2.13, 2 AVX2 cores); ``tests/test_speed_paths.py``
checks each against the plain convolution.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Which of the three taps of a 3x3 kernel (per axis) land on each of the four taps of the equivalent
# stride-2 transposed kernel when the input was nearest-upsampled by 2: [w2, w1 + w2, w0 + w1, w0].
_UPSAMPLE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The networks' memory format: oneDNN's fp32 convolutions run faster on NHWC tensors than on NCHW at
    these channel counts (whole training step 1.11x, docs/performance.md); every convolution's output keeps
    its input's format, so the encoders' input and the decoders' first feature map are converted once."""
    return x.contiguous(memory_format=torch.channels_last)


class PointwiseConv2d(nn.Conv2d):
    """A (strided) 1x1 convolution as a matmul over the channels of a channels-last tensor.

    Why: oneDNN's AVX2 1x1 backward-weights kernel segfaults on channels-last inputs with few channels
    (e.g. nf 4, torch 2.13 CPU); a matmul never does, and gives the same numbers. No speed gain is claimed:
    it exists so that channels-last (above) can run at every width.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(c_in, c_out, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.stride[0]
        x = x[:, :, ::stride, ::stride] if stride > 1 else x
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


class UpsampleConv2d(nn.Conv2d):
    """``conv3x3(nearest_upsample_2x(x))`` (padding 1) as one stride-2 transposed convolution of x.

    Why: each output pixel costs 4 multiply-adds per channel pair instead of 9, and the 4x larger upsampled
    input is never written; the decoders' high-resolution convolutions are most of the training arithmetic.
    Measured: decoder forward + backward 1.53x with channels-last (1.37x channels-last alone), whole training
    step of the default config 1.05x, training GFLOP per example 22.4 -> 15.8. The transposed kernel is
    derived from the stored 3x3 one on every call.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = torch.tensor(_UPSAMPLE_TAPS, dtype=self.weight.dtype, device=self.weight.device)
        weight = torch.einsum("ka,oiab,lb->iokl", taps, self.weight, taps)  # [c_in, c_out, 4, 4]
        return F.conv_transpose2d(x, weight, self.bias, stride=2, padding=1)


class MaskConv2d(nn.Conv2d):
    """The decoders' last convolution: to one channel, returned as [N, H, W], its bias added after the
    convolution instead of inside it. With ``upscale`` 2 it runs at half the mask's resolution, to 4 channels
    that are the 2x2 pixels of each output block (``pixel_shuffle``; ``model.decoder_output: pixel_shuffle``).

    Why the bias apart: accuracy. The bias gradient sums over every pixel of every row; summed inside the
    channels-last convolution its float32 error was 1.2e-5 relative against float64, added apart 9.6e-7 (the
    plain NCHW convolution's: 2.1e-6).
    """

    def __init__(self, c_in: int, upscale: int = 1):
        super().__init__(c_in, upscale * upscale, 3, padding=1)
        self.upscale = upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.weight, None, self.stride, self.padding)
        if self.upscale == 1:
            return h.squeeze(1) + self.bias
        return F.pixel_shuffle(h + self.bias[:, None, None], self.upscale).squeeze(1)
