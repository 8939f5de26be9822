"""Logical views of stored tensors.

Every update map is defined on *logical* matrices ``[m, n]`` in PyTorch Linear convention
(rows = output units: vocabulary tokens, hidden neurons, experts, head features; columns =
input features). Real checkpoints store blocks in other layouts:

* stacked experts ``[E, out, in]`` (OLMoE) or transposed ``[E, in, out]`` (gpt-oss);
* fused gate/up along the neuron axis, concatenated (``[gate; up]``, OLMoE) or interleaved
  (``gate = W[..., ::2]``, ``up = W[..., 1::2]`` on the neuron axis, gpt-oss);
* attention projections split per head: q/k/v ``[H*hd, in]`` -> ``H`` matrices ``[hd, in]``,
  o ``[out, H*hd]`` -> ``H`` matrices ``[out, hd]``; fused qkv is the q/k/v case with
  ``H = Hq + 2*Hkv`` heads of the same head_dim.

A :class:`Layout` turns a stored tensor into a batch ``[B, m, n]`` of logical matrices
(:meth:`Layout.to_logical`) and back (:meth:`Layout.from_logical`), so that
``view -> map -> inverse view`` applies a map to each logical matrix with one batched call.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

__all__ = ["Layout", "MATRIX", "parse_layout"]

HEAD_AXES = ("out", "in")


@dataclass(frozen=True)
class Layout:
    """How a stored parameter maps to a batch of logical ``[out, in]`` matrices.

    Attributes:
        stacked: the leading dim is an expert (or other batch) index: ``[E, a, b]``.
        transposed: storage is ``[..., in, out]`` (logical matrix is the transpose).
        fused: number of equal parts concatenated along the output (neuron) axis,
            e.g. 2 for a fused gate_up projection. Each part is its own logical matrix.
        interleaved: fused parts alternate along the output axis (part ``j`` is rows
            ``j::fused``) instead of being concatenated blocks.
        heads: number of attention heads the matrix splits into (1 = no split).
        head_axis: ``"out"`` splits rows (q/k/v and fused qkv), ``"in"`` splits columns (o).
    """

    stacked: bool = False
    transposed: bool = False
    fused: int = 1
    interleaved: bool = False
    heads: int = 1
    head_axis: str = "out"
    #: a >2-D kernel ``[out, *in_dims]`` (convolution ``[out, in, kh, kw]``) read as the
    #: matrix ``[out, in*kh*kw]`` it applies to each patch
    flatten: bool = False
    #: a 2-D ``[E*a, b]`` weight holding ``E`` experts (``stacked`` after ``unflatten(0, (E, a))``)
    flat_experts: int = 0

    def _stored_view(self, shape) -> tuple[int, ...]:
        """The shape the layout's other fields read (after ``flatten`` / ``flat_experts``)."""
        shape = tuple(shape)
        if self.flatten and len(shape) > 2:
            return (shape[0], math.prod(shape[1:]))
        if self.flat_experts and len(shape) == 2 and shape[0] % self.flat_experts == 0:
            return (self.flat_experts, shape[0] // self.flat_experts, shape[1])
        return shape

    def __post_init__(self):
        if self.fused < 1 or self.heads < 1:
            raise ValueError(f"Layout: fused and heads must be >= 1, got {self}")
        if self.fused > 1 and self.heads > 1:
            raise ValueError(
                "Layout: fused parts and a head split together are not supported; "
                "describe fused qkv as heads=Hq+2*Hkv on the output axis"
            )
        if self.interleaved and self.fused == 1:
            raise ValueError("Layout: interleaved=True needs fused >= 2")
        if self.head_axis not in HEAD_AXES:
            raise ValueError(f"Layout: head_axis must be one of {HEAD_AXES}, got {self.head_axis!r}")

    # -- shapes -----------------------------------------------------------------------
    def check(self, shape: torch.Size | tuple[int, ...], name: str = "parameter") -> None:
        """Raise a ValueError naming ``name`` when ``shape`` does not fit this layout."""
        if self.flatten and len(shape) < 2:
            raise ValueError(f"{name}: layout {self.describe()} needs a >=2-D tensor, got shape {tuple(shape)}")
        if self.flat_experts and (len(shape) != 2 or shape[0] % self.flat_experts):
            raise ValueError(
                f"{name}: layout {self.describe()} needs a 2-D tensor whose rows split into "
                f"{self.flat_experts} experts, got shape {tuple(shape)}"
            )
        shape = self._stored_view(shape)
        want = 3 if self.stacked else 2
        if len(shape) != want:
            raise ValueError(f"{name}: layout {self.describe()} needs a {want}-D tensor, got shape {tuple(shape)}")
        out, inp = (shape[-1], shape[-2]) if self.transposed else (shape[-2], shape[-1])
        if out % self.fused:
            raise ValueError(f"{name}: output axis {out} is not divisible into {self.fused} fused parts")
        if self.heads > 1:
            split = out if self.head_axis == "out" else inp
            if split % self.heads:
                raise ValueError(f"{name}: {self.head_axis} axis {split} is not divisible into {self.heads} heads")

    def logical_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """``(B, m, n)``: number and shape of the logical matrices of a stored ``shape``."""
        shape = self._stored_view(shape)
        batch = shape[0] if self.stacked else 1
        out, inp = (shape[-1], shape[-2]) if self.transposed else (shape[-2], shape[-1])
        if self.fused > 1:
            return batch * self.fused, out // self.fused, inp
        if self.heads > 1:
            if self.head_axis == "out":
                return batch * self.heads, out // self.heads, inp
            return batch * self.heads, out, inp // self.heads
        return batch, out, inp

    # -- views ------------------------------------------------------------------------
    def to_logical(self, x: torch.Tensor) -> torch.Tensor:
        """Stored tensor -> ``[B, m, n]`` logical matrices (a view where possible)."""
        if self.flatten or self.flat_experts:
            x = x.reshape(self._stored_view(x.shape))
        y = x if self.stacked else x.unsqueeze(0)  # [E, a, b]
        if self.transposed:
            y = y.mT  # [E, out, in]
        E, out, inp = y.shape
        if self.fused > 1:
            k, h = self.fused, out // self.fused
            # [E, k, h, in] either way (interleaved: rows stored as (h, k))
            y = y.unflatten(1, (h, k)).transpose(1, 2) if self.interleaved else y.unflatten(1, (k, h))
            return y.reshape(E * k, h, inp)
        if self.heads > 1:
            H = self.heads
            if self.head_axis == "out":
                return y.reshape(E * H, out // H, inp)  # rows h*hd:(h+1)*hd belong to head h
            y = y.unflatten(2, (H, inp // H)).transpose(1, 2)  # [E, H, out, hd]
            return y.reshape(E * H, out, inp // H)
        return y

    def from_logical(self, u: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`to_logical`: ``[B, m, n]`` -> a tensor of the stored ``shape``."""
        stored, shape = shape, self._stored_view(shape)
        E = shape[0] if self.stacked else 1
        out, inp = (shape[-1], shape[-2]) if self.transposed else (shape[-2], shape[-1])
        if self.fused > 1:
            k, h = self.fused, out // self.fused
            y = u.reshape(E, k, h, inp)
            y = y.transpose(1, 2).reshape(E, out, inp) if self.interleaved else y.reshape(E, out, inp)
        elif self.heads > 1 and self.head_axis == "in":
            H = self.heads
            y = u.reshape(E, H, out, inp // H).transpose(1, 2).reshape(E, out, inp)
        else:
            y = u.reshape(E, out, inp)
        if self.transposed:
            y = y.mT
        return y.reshape(stored)

    # -- helpers ----------------------------------------------------------------------
    def without_heads(self) -> Layout:
        return dataclasses.replace(self, heads=1, head_axis="out") if self.heads > 1 else self

    def describe(self) -> str:
        parts = []
        if self.flatten:
            parts.append("flatten")
        if self.flat_experts:
            parts.append(f"experts{self.flat_experts}")
        if self.stacked:
            parts.append("stacked")
        if self.transposed:
            parts.append("transposed")
        if self.fused > 1:
            parts.append(f"fused{self.fused}:{'interleaved' if self.interleaved else 'concat'}")
        if self.heads > 1:
            parts.append(f"heads{self.heads}:{self.head_axis}")
        return "+".join(parts) or "matrix"


MATRIX = Layout()

_TOKEN = re.compile(
    r"^(stacked|transposed|matrix|fused(\d+):(concat|interleaved)|heads(\d+):(out|in)|flatten|experts(\d+))$"
)


def parse_layout(text: str) -> Layout:
    """Parse the :meth:`Layout.describe` syntax, e.g. ``"stacked+transposed+fused2:interleaved"``.

    Used for user overrides (``layouts={"regex": "stacked+fused2:concat"}``).
    """
    kw: dict = {}
    for token in text.split("+"):
        m = _TOKEN.match(token.strip())
        if m is None:
            raise ValueError(
                f"layout {text!r}: cannot parse {token!r}; use tokens stacked, transposed, matrix, "
                "fusedK:concat, fusedK:interleaved, headsH:out, headsH:in, flatten, expertsE joined by '+'"
            )
        if m.group(1) in ("stacked", "transposed", "flatten"):
            kw[m.group(1)] = True
        elif m.group(6):
            kw["flat_experts"] = int(m.group(6))
            kw["stacked"] = True
        elif m.group(2):
            kw["fused"] = int(m.group(2))
            kw["interleaved"] = m.group(3) == "interleaved"
        elif m.group(4):
            kw["heads"] = int(m.group(4))
            kw["head_axis"] = m.group(5)
    return Layout(**kw)
