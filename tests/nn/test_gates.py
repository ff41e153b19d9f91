"""The gate layout (bptt.nn.gates) agrees with the layers, the cells and PyTorch's stacking order."""

import numpy as np
import pytest

import bptt
from bptt.nn.gates import GATES, gate_count, gate_slice


def test_layout():
    assert [gate_count(m) for m in ("rnn_tanh", "rnn_relu", "lstm", "gru")] == [1, 1, 4, 3]
    assert gate_slice("lstm", "f", 5) == slice(5, 10) and gate_slice("lstm", "o", 5) == slice(15, 20)
    assert gate_slice("gru", "n", 3) == slice(6, 9) and gate_slice("rnn_tanh", "h", 4) == slice(0, 4)
    for mode, names in GATES.items():  # the slices tile the G rows, in order
        H = 3
        assert [gate_slice(mode, n, H) for n in names] == [slice(k * H, (k + 1) * H) for k in range(len(names))]
    with pytest.raises(ValueError, match="no gate"):
        gate_slice("gru", "i", 3)
    with pytest.raises(ValueError, match="unknown recurrent mode"):
        gate_count("transformer")


@pytest.mark.parametrize("cls, mode", [(bptt.RNN, "rnn_tanh"), (bptt.LSTM, "lstm"), (bptt.GRU, "gru")])
def test_layers_and_cells_use_it(cls, mode):
    layer = cls(3, 4)
    assert layer.gate_count == gate_count(mode) and layer.params["weight_hh_l0"].shape == (gate_count(mode) * 4, 4)
    cell = {"rnn_tanh": bptt.RNNCell, "lstm": bptt.LSTMCell, "gru": bptt.GRUCell}[mode](3, 4)
    assert cell.gate_count == gate_count(mode)


def test_lstm_forget_gate_slice_is_torchs(torch):
    """Opening only the forget gate's bias (via gate_slice) keeps PyTorch's cell state: c_t = c_{t−1}."""
    ours = bptt.LSTM(2, 3, dtype=np.float64, rng=0)
    for name, p in ours.params.items():
        p[...] = 0.0
    ours.params["bias_ih_l0"][gate_slice("lstm", "f", 3)] = 50.0  # f = 1, i = σ(0) = 0.5, g = tanh(0) = 0
    theirs = torch.nn.LSTM(2, 3).double()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(ours.params[name]))
    x = np.random.default_rng(0).standard_normal((4, 1, 2))
    c0 = np.array([[[0.5, -1.0, 2.0]]])
    _, (_, c_ours) = ours(x, (np.zeros((1, 1, 3)), c0))
    _, (_, c_theirs) = theirs(torch.from_numpy(x), (torch.zeros(1, 1, 3, dtype=torch.float64), torch.from_numpy(c0)))
    np.testing.assert_allclose(c_ours, c0, rtol=1e-12)
    np.testing.assert_allclose(c_ours, c_theirs.detach().numpy(), rtol=1e-12)
