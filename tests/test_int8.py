"""osum.int8: int8 weights as torch.ao's dynamic quantisation makes them, activations per token."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from osum.int8 import TokenInt8Linear


def test_weights_are_torch_dynamic_per_channel_int8() -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    ours = torch.ops.quantized.linear_unpack(TokenInt8Linear(linear).packed)[0]
    reference = nn.Linear(96, 40, bias=False)
    reference.weight = nn.Parameter(linear.weight.detach().clone())
    reference.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DynamicLinear.from_float(reference).weight()
    assert torch.equal(ours.int_repr(), theirs.int_repr())
    assert torch.equal(ours.q_per_channel_scales(), theirs.q_per_channel_scales())


def test_output_is_the_float_layer_within_int8_error_and_each_row_alone_in_any_batch() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    q = TokenInt8Linear(linear)
    x = torch.randn(5, 64) * torch.tensor([[1.0], [10.0], [0.1], [3.0], [1.0]])  # rows of different ranges
    with torch.no_grad():
        want, got = linear(x), q(x)
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 0.03
        for i in range(5):  # a row's result does not depend on its neighbours
            assert torch.equal(q(x[i : i + 1])[0], got[i])
