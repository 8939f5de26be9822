"""Layouts: logical views round-trip, and each view picks the right logical matrices
(checked against explicit slicing of the stored tensor)."""

import pytest
import torch

from equiopt.layouts import MATRIX, Layout, parse_layout

CASES = [
    (Layout(), (6, 4)),
    (Layout(transposed=True), (4, 6)),
    (Layout(stacked=True), (3, 6, 4)),
    (Layout(stacked=True, transposed=True), (3, 4, 6)),
    (Layout(stacked=True, fused=2), (3, 10, 4)),
    (Layout(stacked=True, transposed=True, fused=2, interleaved=True), (3, 4, 10)),
    (Layout(heads=3, head_axis="out"), (12, 8)),
    (Layout(heads=4, head_axis="in"), (8, 12)),
]


@pytest.mark.parametrize("layout,shape", CASES, ids=lambda c: c.describe() if isinstance(c, Layout) else str(c))
def test_round_trip_and_shape(layout, shape):
    x = torch.randn(shape)
    y = layout.to_logical(x)
    assert tuple(y.shape) == layout.logical_shape(shape)
    assert torch.equal(layout.from_logical(y, shape), x)


def test_interleaved_gpt_oss_parts():
    # gpt-oss: gate_up [E, d, 2h], gate = [..., ::2], up = [..., 1::2]; logical [out=h, in=d]
    E, d, h = 2, 4, 3
    w = torch.randn(E, d, 2 * h)
    y = Layout(stacked=True, transposed=True, fused=2, interleaved=True).to_logical(w).reshape(E, 2, h, d)
    assert torch.equal(y[:, 0], w[..., ::2].mT)
    assert torch.equal(y[:, 1], w[..., 1::2].mT)


def test_concat_olmoe_parts():
    E, d, h = 2, 4, 3
    w = torch.randn(E, 2 * h, d)  # gate, up = chunk(2) of the output
    y = Layout(stacked=True, fused=2).to_logical(w).reshape(E, 2, h, d)
    assert torch.equal(y[:, 0], w[:, :h])
    assert torch.equal(y[:, 1], w[:, h:])


def test_heads_out_and_in():
    H, hd, d = 3, 2, 5
    q = torch.randn(H * hd, d)
    y = Layout(heads=H).to_logical(q)
    for h in range(H):
        assert torch.equal(y[h], q[h * hd : (h + 1) * hd])
    o = torch.randn(d, H * hd)
    y = Layout(heads=H, head_axis="in").to_logical(o)
    for h in range(H):
        assert torch.equal(y[h], o[:, h * hd : (h + 1) * hd])


def test_check_and_errors():
    with pytest.raises(ValueError, match="w.*divisible"):
        Layout(heads=5).check((12, 8), "w")
    with pytest.raises(ValueError, match="3-D"):
        Layout(stacked=True).check((4, 4), "w")
    with pytest.raises(ValueError, match="interleaved"):
        Layout(interleaved=True)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_layout("stacked+sideways")


def test_parse_describe_round_trip():
    for layout, _ in CASES:
        assert parse_layout(layout.describe()) == layout
    assert parse_layout("matrix") == MATRIX
