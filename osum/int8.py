"""int8 linear layers for CPU whose result for a token does not depend on the other tokens in the call.

PyTorch's dynamic quantisation (fbgemm) quantises a layer's input with one scale and zero point
per call, taken from the whole input's range. A token's output then depends on what else is in
the batch: the same utterance decoded alone, verified together with a draft, or batched with
other sessions gives slightly different logits, enough to flip a close greedy choice. A
streaming final must equal offline recognition and one session must never change another's
result, so that is not acceptable here.

:class:`TokenInt8Linear` keeps fbgemm's kernel (int8 weights with a scale per output channel,
int32 accumulation) and makes the activation scale per token: each row is mapped onto [0, 1] by
its own minimum and range (``x = low + width * u``, so ``W x = width * W u + low * W 1``), and
fbgemm's static-input kernel quantises [0, 1] with one fixed scale (the 7 bits of its dynamic
path). Each row is then quantised the same way whatever its neighbours, and integer accumulation
is exact: a row's output is bit-identical alone or in any batch (tested). A lone token is
quantised as fbgemm's dynamic path quantises a call of one token (7 bits over its own range); in
a batch each token keeps that precision instead of sharing the widest row's range. On osum-mini's
100 held-out prompts the WER is the same as with the dynamic path (docs/osum-mini.md).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["TokenInt8Linear", "quantize_linears"]

# fbgemm: fp32 input quantised with a given scale and zero point, int8 weights, fp32 output
_linear_u8 = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
_SCALE = 1.0 / 127
_TINY = torch.finfo(torch.float32).tiny


class TokenInt8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (per output channel) and int8 activations per token."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.ao.nn.quantized.modules.utils import _quantize_weight
        from torch.ao.quantization import per_channel_dynamic_qconfig

        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # (out, in)
        with warnings.catch_warnings():  # torch.ao's eager quantisation is deprecated for torchao, still supported
            warnings.simplefilter("ignore")
            # what torch.ao's dynamic Linear.from_float does (int8, a symmetric scale per output
            # channel), without the throwaway float layer and the two extra packings it makes
            # (7 s of osum-mini's 27 s load went on those for its 169 layers, 2026-12-07)
            observer = per_channel_dynamic_qconfig.weight()
            observer(weight)
            qweight = _quantize_weight(weight, observer)
        # no bias inside: the bias is added after the per-token rescaling
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)  # fbgemm's packed int8 weights
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        # W @ 1 with the int8 weights as dequantised: the term a row's offset contributes. In
        # blocks of rows, so that the output layer (151,936 x 896) is never whole in fp32 a
        # second time while it loads (each row's sum is the same bits either way)
        self.register_buffer("row_sums", torch.cat([qweight[i : i + 4096].dequantize().sum(-1)
                                                    for i in range(0, self.out_features, 4096)]))  # (out,) # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per-call Python overhead matters (a decode step makes 169 of these calls): attribute
        # lookups are kept to a few and the arithmetic is done in place
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        # each row mapped onto [0, 1] by its own range: x = low + width * u, so W x = width * W u + low * W 1
        low, high = torch.aminmax(x, dim=-1, keepdim=True)  # (N, 1) each
        width = (high - low).clamp_min_(_TINY)
        # u quantised with the fixed scale 1/127 (the 7 bits fbgemm's dynamic path uses), int8 weights
        y = _linear_u8((x - low).div_(width), _SCALE, 0, self.packed).mul_(width).addcmul_(low, self.row_sums)  # (N, out)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` by :class:`TokenInt8Linear`, one at a time
    (the float weights of each are freed, by reference counting, before the next is converted)."""
    def swap(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, TokenInt8Linear(child))
            else:
                swap(child)

    swap(module)
    return module
