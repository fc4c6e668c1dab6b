"""Wire codecs: how an activation crosses a link between two stages (job field
[transport] wire).

On a slow link the bytes of an activation cost more than computing it (at 1 Mb/s one
Llama2-7B token, 16 KB in fp32, takes 131 ms). A codec shrinks what is sent:

    exact  the stage's own dtype, unchanged (the default; bitwise what the model computes)
    bf16   each value rounded to bfloat16: relative error <= 2^-8
    fp16   each value rounded to float16, clamped to +-65504: relative error <= 2^-11 for
           |x| >= 2^-14 (the normal range), absolute error <= 2^-25 below it
    int8   per token (one row of H values): scale = max|x| / 127 (kept in float32) and
           q = round(x / scale) in int8: absolute error <= scale / 2 = max|x| / 254

Only hidden states between stages are encoded: token ids going back to the source are
never touched, and a hand-over between two stages on the same rank does not cross a wire,
so it is not encoded either. Every encoded message is a flat uint8 tensor (one MPI byte
buffer); the receiver knows how many tokens it holds from the schedule (the prompt at step
0, one token per sequence after).

`bytes_per_token` is what the planner prices a hop with (planner/problem.py:
compress_activations), so a slow link sees the compressed size.
"""

from __future__ import annotations

import torch

WIRES = ("exact", "bf16", "fp16", "int8")
FP16_MAX = 65504.0
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bytes_per_token(wire: str, hidden: int, dtype_bytes: int) -> int:
    """Bytes one token's activation (H values) takes on the wire."""
    if wire == "exact":
        return hidden * dtype_bytes
    if wire in _CAST:
        return hidden * 2
    if wire == "int8":
        return hidden + 4  # the int8 values and one float32 scale
    raise ValueError(f"wire {wire!r}: use one of {', '.join(WIRES)}")


def ratio(wire: str, hidden: int, dtype_bytes: int) -> float:
    """Wire bytes over the stage dtype's bytes, per token (1.0 for exact)."""
    return bytes_per_token(wire, hidden, dtype_bytes) / (hidden * dtype_bytes)


class Codec:
    """encode(h [..., H]) -> flat uint8; decode(buf, tokens, H, dtype) -> [tokens, H]."""

    def __init__(self, wire: str):
        if wire not in WIRES:
            raise ValueError(f"wire {wire!r}: use one of {', '.join(WIRES)}")
        self.wire = wire

    @property
    def exact(self) -> bool:
        return self.wire == "exact"

    def nbytes(self, tokens: int, hidden: int, dtype: torch.dtype) -> int:
        return tokens * bytes_per_token(self.wire, hidden, dtype.itemsize)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        h = h.detach()
        if self.wire == "exact":
            return h.contiguous().view(-1).view(torch.uint8)
        rows = h.reshape(-1, h.shape[-1])
        if self.wire in _CAST:
            if self.wire == "fp16":  # beyond fp16's range would become inf
                rows = rows.clamp(-FP16_MAX, FP16_MAX)
            return rows.to(_CAST[self.wire]).contiguous().view(-1).view(torch.uint8)
        x = rows.float()
        scale = x.abs().amax(dim=1, keepdim=True) / 127.0  # [T, 1]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe).clamp_(-127, 127).to(torch.int8)
        head = scale.contiguous().view(-1).view(torch.uint8)
        return torch.cat([head, q.view(-1).view(torch.uint8)])

    def decode(self, buf: torch.Tensor, tokens: int, hidden: int, dtype: torch.dtype):
        """The first `tokens` rows of an encoded message in `buf` (uint8, may be longer)."""
        n = self.nbytes(tokens, hidden, dtype)
        raw = buf[:n]
        if self.wire == "exact":
            return raw.view(dtype).view(tokens, hidden)
        if self.wire in _CAST:
            return raw.view(_CAST[self.wire]).view(tokens, hidden).to(dtype)
        scale = raw[: 4 * tokens].view(torch.float32).view(tokens, 1)
        q = raw[4 * tokens :].view(torch.int8).view(tokens, hidden)
        return (q.float() * scale).to(dtype)

    def error_bound(self, h: torch.Tensor) -> torch.Tensor:
        """The stated worst-case absolute error of each value of h (tests check it)."""
        x = h.float()
        if self.wire == "exact":
            return torch.zeros_like(x)
        if self.wire == "bf16":
            return x.abs() * 2.0**-8
        if self.wire == "fp16":
            over = (x.abs() - FP16_MAX).clamp(min=0)  # clamped values lose their excess
            return torch.maximum(x.abs() * 2.0**-11, torch.full_like(x, 2.0**-25)) + over
        top = x.abs().amax(dim=-1, keepdim=True)  # + float32 rounding of q * scale
        return (top / 254.0 + top * 2.0**-22).expand_as(x)
