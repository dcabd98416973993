"""Encoder-decoder models (T5, BART, ...) exported as two ONNX files: explain a decoder logit over BOTH the
encoder input tokens and the decoder input tokens.

Chaining in gradient form: the decoder pass gives the modified gradient ``G`` at ``encoder_hidden_states``
(its relevance there is ``R = h * G``); the encoder pass then starts at its output ``h`` with
``output_relevance = G`` (``R_out = G * h``, the same relevance), so the encoder tokens receive what flowed
into the encoder states. ``G`` is recovered as ``R / h`` (exact to one rounding where ``h != 0``; entries
with ``h == 0`` carry no relevance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import InputError
from .explainer import Explainer, Explanation


@dataclass
class Seq2SeqExplanation:
    """``encoder_relevance``/``decoder_relevance``: ``(batch, [targets,] seq)`` token relevance of the encoder
    and decoder input ids (an encoder without ``input_ids``, e.g. Whisper: the relevance of its float input, in
    that input's shape); ``decoder``/``encoder``: the two underlying explanations."""

    encoder_relevance: np.ndarray
    decoder_relevance: np.ndarray
    score: np.ndarray
    target: np.ndarray | None
    position: np.ndarray | None
    decoder: Explanation
    encoder: Explanation


def explain_seq2seq(
    encoder: Explainer,
    decoder: Explainer,
    encoder_inputs: Mapping[str, Any],
    decoder_input_ids: np.ndarray,
    target: Any = None,
    position: Any = None,
    *,
    hidden_input: str = "encoder_hidden_states",
    mask_input: str = "encoder_attention_mask",
    encoder_output: str | None = None,
) -> Seq2SeqExplanation:
    """Explain ``decoder`` logits at ``target``/``position`` over encoder and decoder tokens.

    ``encoder_inputs``: the encoder's inputs (``input_ids``, ``attention_mask``); the decoder receives the
    encoder's output as ``hidden_input`` and the encoder's ``attention_mask`` as ``mask_input`` when it has one.
    """
    if hidden_input not in decoder.input_names:
        raise InputError(f"decoder {decoder.graph.source}: no input {hidden_input!r}; inputs: {decoder.input_names}")
    encoder_output = encoder_output or encoder.default_output
    hidden = encoder.forward(encoder_inputs)[encoder_output]
    dec_inputs: dict[str, Any] = {"input_ids": decoder_input_ids, hidden_input: hidden}
    if mask_input in decoder.input_names and "attention_mask" in encoder_inputs:
        dec_inputs[mask_input] = encoder_inputs["attention_mask"]
    dec = decoder.explain(dec_inputs, target=target, position=position)
    r_hidden = dec.relevance[hidden_input]  # (batch, [k,] seq, hidden)
    multi = r_hidden.ndim == hidden.ndim + 1
    h = hidden[:, None] if multi else hidden
    g = np.where(h != 0, r_hidden / np.where(h != 0, h, 1), 0.0)
    if multi:  # k targets: output_relevance takes them on the leading axis
        g = np.moveaxis(g, 1, 0)
    enc = encoder.explain(encoder_inputs, output=encoder_output, output_relevance=g)
    main = "input_ids" if "input_ids" in enc.relevance else next(iter(enc.relevance))  # e.g. Whisper's features
    return Seq2SeqExplanation(
        encoder_relevance=enc.relevance[main],
        decoder_relevance=dec.relevance["input_ids"],
        score=dec.score,
        target=dec.target,
        position=dec.position,
        decoder=dec,
        encoder=enc,
    )
