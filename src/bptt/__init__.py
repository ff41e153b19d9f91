"""bptt: recurrent neural networks with hand-derived backpropagation through time."""

from bptt.gradcheck import GradcheckError, gradcheck, numerical_gradient, rel_error
from bptt.module import Module, StateDictError

__version__ = "0.1.0"
