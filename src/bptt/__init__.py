"""bptt: recurrent neural networks with hand-derived backpropagation through time.

The layers (``RNN``, ``LSTM``, ``GRU`` and their cells) take PyTorch's
constructor arguments, shapes and parameter names; every module has
``forward`` and a hand-written ``backward`` that accumulates into ``.grads``.
"""

from bptt.nn.adaptive import AdaptiveLogSoftmaxWithLoss
from bptt.nn.cells import GRUCell, LSTMCell, RNNCell
from bptt.nn.gradcheck import GradcheckError, gradcheck, numerical_gradient, rel_error
from bptt.nn.layers import Dropout, Embedding, Linear
from bptt.nn.rnn import GRU, LSTM, RNN
from bptt.nn.losses import cross_entropy, log_softmax, mse, softmax
from bptt.nn.module import Module, StateDictError
from bptt.nn.multihead import MultiheadAttention, scaled_dot_product_attention
from bptt.nn.norm import LayerNorm
from bptt.nn.feedforward import GELU, LearnedPositionalEmbedding, PositionwiseFeedForward, ReLU, SinusoidalPositionalEncoding
from bptt.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from bptt.nn.optim import (
    SGD,
    Adagrad,
    Adam,
    AdamW,
    RMSprop,
    clip_grad_norm,
    clip_grad_value,
    make_optimizer,
    make_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "Linear", "Embedding", "Dropout", "Module",
    "StateDictError", "cross_entropy", "mse", "softmax", "log_softmax", "SGD", "Adagrad", "RMSprop", "Adam",
    "AdamW", "clip_grad_norm", "clip_grad_value", "make_optimizer", "make_schedule", "gradcheck",
    "numerical_gradient", "rel_error", "GradcheckError",
    "MultiheadAttention", "scaled_dot_product_attention", "LayerNorm", "ReLU", "GELU", "PositionwiseFeedForward",
    "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "TransformerEncoderLayer", "TransformerDecoderLayer",
    "TransformerEncoder", "TransformerDecoder", "Transformer", "AdaptiveLogSoftmaxWithLoss",
]
