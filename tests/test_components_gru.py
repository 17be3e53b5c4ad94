"""encoder/gru (GRU4Rec): a plain GRU over each row's real items, whatever the left padding."""

from __future__ import annotations

import torch

from rex.components.encoders.gru import GRUEncoder


def _left_pad(rows: list[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(rows), width, rows[0].shape[-1])
    padding = torch.ones(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        x[i, width - len(row) :] = row
        padding[i, width - len(row) :] = False
    return x, padding


def test_each_row_is_the_gru_over_its_own_items_whatever_the_padding() -> None:
    torch.manual_seed(0)
    encoder = GRUEncoder(dim=4, hidden=6).eval()
    rows = [torch.randn(n, 4) for n in (5, 2, 1, 3)]
    for width in (5, 8):  # the same rows padded to two batch widths
        x, padding = _left_pad(rows, width)
        out = encoder(x, padding)
        assert out.shape == (4, width, 4)
        for i, row in enumerate(rows):
            alone = encoder.proj(encoder.gru(row[None])[0])[0]  # the GRU over the row, unpadded
            torch.testing.assert_close(out[i, width - len(row) :], alone)
            assert bool((out[i, : width - len(row)] == 0).all())
        torch.testing.assert_close(encoder(x, padding, last_only=True), out[:, -1:])


def test_states_read_only_earlier_items_and_gradients_flow() -> None:
    torch.manual_seed(1)
    encoder = GRUEncoder(dim=4, num_layers=2)
    x = torch.randn(2, 5, 4, requires_grad=True)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    changed = x.detach().clone()
    changed[:, 3] += 1.0
    torch.testing.assert_close(encoder(x, padding)[:, :3], encoder(changed, padding)[:, :3])
    encoder(x, padding).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_an_all_padding_row_gives_zeros() -> None:
    encoder = GRUEncoder(dim=3)
    x, padding = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool)
    padding[1] = True
    out = encoder(x, padding)
    assert bool((out[1] == 0).all()) and bool(torch.isfinite(out).all())
