"""bptt: recurrent neural networks with hand-derived backpropagation through time."""

from bptt.cells import GRUCell, LSTMCell, RNNCell
from bptt.gradcheck import GradcheckError, gradcheck, numerical_gradient, rel_error
from bptt.layers import GRU, LSTM, RNN, Dropout, Embedding, Linear
from bptt.module import Module, StateDictError

__version__ = "0.1.0"
