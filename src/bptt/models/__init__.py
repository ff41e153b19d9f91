"""Complete models built from the layers: encoder-decoder (seq2seq) and others beside it."""

from bptt.models.seq2seq import Seq2Seq, Seq2SeqConfig
