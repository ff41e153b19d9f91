"""Attention in cache-sized tiles (bptt.nn.attention_tiles): the same outputs, weights and gradients as the
whole-array path and as torch, with several tiles (the last one short), two threads, causal row blocks,
masks that are added, dead rows, dropout and a gradient for the weights."""

import numpy as np
import pytest

from bptt.nn import attention_tiles
from bptt.nn.gradcheck import rel_error
from bptt.nn.multihead import MultiheadAttention, causal_mask, scaled_dot_product_attention
from bptt.runtime import policy, threads

from conftest import require_numba


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles at any size, of 3 score matrices each when L = S = 40 (float64), causal blocks of 10+ rows, and
    two threads whatever this machine has; returns a switch that turns the tiles off."""
    require_numba()
    monkeypatch.setattr(policy, "ATTENTION_TILES_MIN_BYTES", 0)
    monkeypatch.setattr(policy, "ATTENTION_TILE_BYTES", 3 * 40 * 40 * 8)
    monkeypatch.setattr(attention_tiles, "_MIN_BLOCK_ROWS", 10)
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)

    def off():
        monkeypatch.setattr(policy, "ATTENTION_TILES_MIN_BYTES", 1 << 62)

    return off


def test_tiles_and_blocks_cover_everything():
    require_numba()
    keys = attention_tiles._tiles((2, 7), 40, 40, 8)  # ATTENTION_TILE_BYTES holds 40 of these: one tile a row
    assert keys == [(0, slice(0, 7)), (1, slice(0, 7))]
    assert attention_tiles._blocks(40, 40, True) == [(0, 40, 40)]  # fewer than 2 × 128 rows: one block
    assert attention_tiles._blocks(512, 512, True) == [(0, 128, 128), (128, 256, 256), (256, 384, 384),
                                                       (384, 512, 512)]
    assert attention_tiles._blocks(1024, 1024, True) == [(0, 256, 256), (256, 512, 512), (512, 768, 768),
                                                         (768, 1024, 1024)]
    assert attention_tiles._blocks(512, 300, True) == [(0, 512, 300)]  # not square: no blocks
    assert attention_tiles._blocks(512, 512, False) == [(0, 512, 512)]
    assert attention_tiles._blocks(20, 30, False) == [(0, 20, 30)]


def _run_mha(x, kw, dout, dweights, seed, dropout):
    """Forward and backward of one MultiheadAttention (fixed weights; dropout masks from ``seed``)."""
    E = x.shape[-1]
    m = MultiheadAttention(E, 4, dropout=dropout, dtype=x.dtype, rng=seed)
    out, w = m(x, x, x, **kw)
    dx = m.backward_self(dout, dweights)
    return out, w, dx, {k: v.copy() for k, v in m.grads.items()}


@pytest.mark.parametrize("case", ["causal", "kpm_dead_row", "dropout_weights", "plain"])
def test_mha_tiles_equal_whole_arrays(small_tiles, case):
    """(T 40, N 5, E 16, 4 heads), float64: 20 score matrices in 7 tiles over two threads; the causal case
    runs in 4 row blocks.  Everything equal to the whole-array path to rounding."""
    rng = np.random.default_rng(0)
    T, N, E = 40, 5, 16
    x = rng.standard_normal((T, N, E))
    dout = rng.standard_normal((T, N, E))
    kw, dweights, dropout = dict(need_weights=False), None, 0.0
    if case == "causal":
        kw.update(attn_mask=causal_mask(T), is_causal=True)
    elif case == "kpm_dead_row":  # every key of batch item 2 is padding: its rows are zeros
        kpm = rng.random((N, T)) < 0.3
        kpm[2] = True
        kw.update(key_padding_mask=kpm)
    elif case == "dropout_weights":
        kw.update(attn_mask=causal_mask(T), need_weights=True, average_attn_weights=False)
        dweights, dropout = rng.standard_normal((N, 4, T, T)), 0.25
    tiled = _run_mha(x, kw, dout, dweights, 3, dropout)
    small_tiles()
    whole = _run_mha(x, kw, dout, dweights, 3, dropout)
    for a, b in zip(tiled[:3], whole[:3]):
        if b is None:
            assert a is None
        else:
            assert rel_error(a, b) < 1e-13
    for k in whole[3]:
        assert rel_error(tiled[3][k], whole[3][k]) < 1e-13, k
    if case == "kpm_dead_row":
        assert (tiled[0][:, 2] == whole[0][:, 2]).all()


def test_sdpa_tiles_match_torch(torch, small_tiles):
    """F.scaled_dot_product_attention, causal, (B 9, L = S 40, d 8), float64, through the tiles and blocks:
    output and the three gradients against torch."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((9, 40, 8)) for _ in range(3))
    do = rng.standard_normal((9, 40, 8))
    assert attention_tiles.usable(q, k, v)
    out, cache = scaled_dot_product_attention(q, k, v, is_causal=True)
    from bptt.nn.multihead import scaled_dot_product_attention_backward

    dq, dk, dv = scaled_dot_product_attention_backward(do, cache)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    (tout * torch.tensor(do)).sum().backward()
    assert rel_error(out, tout.detach().numpy()) < 1e-12
    for ours, theirs in ((dq, tq), (dk, tk), (dv, tv)):
        assert rel_error(ours, theirs.grad.numpy()) < 1e-12
    assert (cache.weights[:, causal_mask(40)] == 0).all()


@pytest.mark.parametrize("norm_first", [True, False])
def test_layer_in_row_slices_and_tiles_matches_torch(torch, small_tiles, monkeypatch, norm_first):
    """A TransformerEncoderLayer (GELU, causal) whose attention runs in tiles holds BLAS to one thread and
    runs its products, GELU and LayerNorms in row slices on two threads (forced here at a small size):
    output, ∂L/∂x and every parameter gradient equal torch's in float64."""
    from bptt.nn.transformer import TransformerEncoderLayer

    monkeypatch.setattr(threads, "OUTER_THREADS", [2])  # as inside single_thread_blas with two cores
    monkeypatch.setattr(policy, "MIN_ROWS_PER_THREAD", 8)
    monkeypatch.setattr(policy, "MIN_MACS_PER_THREAD", 1)
    assert len(policy.row_slices(200, 1)) == 2
    T, N, E = 40, 5, 16
    ours = TransformerEncoderLayer(E, 4, 64, dropout=0.0, activation="gelu", norm_first=norm_first,
                                   dtype=np.float64, rng=0)
    theirs = torch.nn.TransformerEncoderLayer(E, 4, 64, dropout=0.0, activation="gelu", norm_first=norm_first,
                                              dtype=torch.float64)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(4)
    x, g = rng.standard_normal((T, N, E)), rng.standard_normal((T, N, E))
    y = ours(x, src_mask=causal_mask(T), is_causal=True)
    assert ours._one_blas_thread
    dx = ours.backward(g)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx, src_mask=torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64),
                is_causal=True)
    (ty * torch.tensor(g)).sum().backward()
    assert rel_error(y, ty.detach().numpy()) < 1e-12
    assert rel_error(dx, tx.grad.numpy()) < 1e-12
    for name, p in theirs.named_parameters():
        assert rel_error(ours.grads[name], p.grad.numpy()) < 1e-12, name
