"""Relative position bias: Swin's and NAT's index conventions, cropping and resizing tables."""
import pytest
import torch
from timm.models.swin_transformer import get_relative_position_index

from visionzoo.kernels import na2d
from visionzoo.layers import (
    crop_rel_pos_table,
    relative_position_index_key_minus_query,
    relative_position_index_query_minus_key,
    resize_rel_pos_table,
)


@pytest.mark.parametrize("window_size", [(7, 7), (3, 5), (1, 4)])
def test_query_minus_key_is_swins_index(window_size):
    expected = get_relative_position_index(*window_size)
    assert torch.equal(relative_position_index_query_minus_key(window_size), expected)


def test_index_offsets_by_hand():
    # 2x3 window, tokens row-major: token 0 = (0, 0), token 5 = (1, 2); table (3, 5), centre 7
    swin = relative_position_index_query_minus_key((2, 3))
    nat = relative_position_index_key_minus_query((2, 3))
    assert swin[0, 0] == nat[0, 0] == 1 * 5 + 2  # zero offset
    assert swin[5, 0] == (1 + 1) * 5 + (2 + 2)  # query (1, 2) - key (0, 0) = (+1, +2)
    assert nat[5, 0] == (-1 + 1) * 5 + (-2 + 2)  # key - query = (-1, -2)
    assert torch.equal(nat, swin.T)


def test_key_minus_query_is_the_bias_neighborhood_attention_adds():
    # a window covering the whole map: every query sees every key, and with zero queries the
    # attention weights are softmax(bias) alone
    torch.manual_seed(0)
    heads, height, width, dim = 2, 4, 5, 8
    rpb = torch.randn(heads, 2 * height - 1, 2 * width - 1)
    q = torch.zeros(1, height, width, heads, dim)
    k = torch.randn(1, height, width, heads, dim)
    v = torch.randn(1, height, width, heads, dim)
    out = na2d(q, k, v, (height, width), rpb=rpb, backend="reference")
    bias = rpb.flatten(1)[:, relative_position_index_key_minus_query((height, width))]  # [heads, N, N]
    expected = torch.softmax(bias, dim=-1) @ v.reshape(height * width, heads, dim).transpose(0, 1)
    torch.testing.assert_close(out.reshape(height * width, heads, dim), expected.transpose(0, 1))
    # the other convention reads the mirrored table
    swin_bias = rpb.flatten(1)[:, relative_position_index_query_minus_key((height, width))]
    assert not torch.allclose(swin_bias, bias)
    torch.testing.assert_close(rpb.flip(-1, -2).flatten(1)[:, relative_position_index_query_minus_key((height, width))], bias)


def test_crop_keeps_the_offsets_of_the_smaller_window():
    table = torch.randn(3, 13, 9)  # window (7, 5)
    crop = crop_rel_pos_table(table, (3, 2))
    assert crop.shape == (3, 5, 3)
    for dy in range(-2, 3):
        for dx in range(-1, 2):
            assert torch.equal(crop[:, dy + 2, dx + 1], table[:, dy + 6, dx + 4])
    assert torch.equal(crop_rel_pos_table(table, (7, 5)), table)
    with pytest.raises(ValueError, match="window_size"):
        crop_rel_pos_table(table, 8)


def test_resize_to_another_window():
    torch.manual_seed(0)
    table = torch.randn(4, 13, 13)
    assert resize_rel_pos_table(table, 7) is table
    larger = resize_rel_pos_table(table, 9)
    assert larger.shape == (4, 17, 17)
    # the zero offset stays where it is, and the ends of the offset range stay the ends
    torch.testing.assert_close(larger[:, 8, 8], table[:, 6, 6])
    torch.testing.assert_close(larger[:, 0, 0], table[:, 0, 0], rtol=1e-4, atol=1e-4)
    constant = torch.full((4, 13, 13), 0.25)
    torch.testing.assert_close(resize_rel_pos_table(constant, (5, 9)), torch.full((4, 9, 17), 0.25))
    # Swin's flat layout, a non-square source needs its window
    flat = torch.randn(13 * 9, 4)
    resized = resize_rel_pos_table(flat, (5, 5), old_window_size=(7, 5))
    assert resized.shape == (9 * 9, 4)
    with pytest.raises(ValueError, match="table must be"):
        resize_rel_pos_table(torch.randn(13), 7)
