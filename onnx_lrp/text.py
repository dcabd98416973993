"""Text front end: explain a string or a chat prompt with the model's own tokenizer.

>>> tx = TextExplainer("~/.cache/onnx-lrp/models/SmolLM2-135M-Instruct/onnx/model.onnx")
>>> res = tx.explain("The capital of France is")          # target: the model's next-token prediction
>>> res.tokens, res.relevance                                # one relevance per input token
>>> gen = tx.explain_generation("The capital of France is", max_new_tokens=5)
>>> gen.matrix                                               # (generated tokens, prompt + generated tokens)

The tokenizer is read from ``tokenizer.json`` next to the ONNX file (the ``tokenizers`` package, imported when
first needed); chat prompts are rendered with the model's chat template (``jinja2``). A transformers tokenizer
object may be passed instead. Labels of classifiers come from ``config.json`` (``id2label``).

Kinds of models: *causal LMs* (output ``(batch, seq, vocab)``: the next token at the last position is
explained), *classifiers* (output ``(batch, classes)``) and *encoders* (``last_hidden_state``; explain a
similarity of mean-pooled embeddings with :meth:`TextExplainer.similarity`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ._files import read_json
from .errors import InputError, ModelLoadError, TargetError
from .explainer import Explainer
from .progress import bar

Chat = Sequence[Mapping[str, str]]
_MIN_VOCAB_SHARE = 0.9  # a tokenizer covers at least this share of the embedding table's rows


# ---------------------------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """The few tokenizer operations the front end needs, over ``tokenizers.Tokenizer`` or a transformers
    tokenizer. ``folder`` supplies ``tokenizer_config.json`` (chat template, special tokens)."""

    def __init__(self, backend: Any, config: dict | None = None):
        self.backend = backend
        self.config = config or {}
        self._fast = type(backend).__module__.startswith("tokenizers")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        folder = Path(folder)
        config = read_json(folder / "tokenizer_config.json")
        template = folder / "chat_template.jinja"
        if template.is_file() and "chat_template" not in config:
            config["chat_template"] = template.read_text()
        if (folder / "tokenizer.json").is_file():
            try:
                from tokenizers import Tokenizer as _Tok
            except ImportError as err:  # pragma: no cover
                raise ImportError("reading tokenizer.json needs the `tokenizers` package: "
                                  "pip install 'onnx-lrp[text]'") from err
            try:
                tok = _Tok.from_file(str(folder / "tokenizer.json"))
            except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
                raise ModelLoadError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({exc})") from None
            tok.no_padding()  # some tokenizer.json files pad every text to a fixed length (all-MiniLM: 128)
            tok.no_truncation()  # never drop text silently
            return cls(tok, config)
        hint = ("export the model with `onnx-lrp export` to save its tokenizer next to it, or name a folder "
                "holding one (TextExplainer(tokenizer=Tokenizer.from_folder(dir)), CLI --tokenizer DIR)")
        if not config:
            raise ModelLoadError(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json); {hint}")
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover
            raise ModelLoadError(f"{folder}: no tokenizer.json, and transformers is not installed to read the "
                                 f"tokenizer there; {hint}") from None
        try:
            return cls(AutoTokenizer.from_pretrained(str(folder)), config)
        except Exception as exc:  # transformers raises OSError, ValueError, ... for incomplete folders
            raise ModelLoadError(f"{folder}: no tokenizer.json, and transformers cannot load a tokenizer from "
                                 f"tokenizer_config.json alone ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                                 f"{hint}") from None

    def encode(self, text: str, special: bool = True) -> list[int]:
        if self._fast:
            return list(self.backend.encode(text, add_special_tokens=special).ids)
        return list(self.backend(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def special_ids(self) -> set[int]:
        if self._fast:
            return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return set(self.backend.all_special_ids)

    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True) if self._fast else len(self.backend))

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token) if self._fast else self.backend.convert_tokens_to_ids(token)

    def chat(self, messages: Chat, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        if not self._fast and getattr(self.backend, "chat_template", None):
            return list(self.backend.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt))
        template = self.config.get("chat_template")
        if not template:
            raise InputError("this tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise InputError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.config.get("bos_token") or "", eos_token=self.config.get("eos_token") or "",
        )
        return self.encode(text, special=False)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The text each token adds to the decoded string (spaces included, ``##`` joined), so that
        ``"".join(pieces)`` reads as the text. A character split over several tokens (emoji, CJK in byte-level
        BPE) belongs to the token that completes it; the tokens before add ``""``. Where the decoder rewrites
        earlier text (clean-up), the token's own form is shown."""
        out: list[str] = []
        shown = ""  # the decoded text so far, up to the last complete character
        cur = ""
        for k in range(len(ids)):
            cur = self.decode(ids[: k + 1])
            if not cur.startswith(shown):  # clean-up changed earlier text: the token alone
                out.append(self.decode([ids[k]]))
                shown = cur
            elif "\ufffd" in cur[len(shown):]:  # an unfinished multi-byte character: its token comes later
                out.append("")
            else:
                out.append(cur[len(shown):])
                shown = cur
        if out and cur.startswith(shown) and cur != shown:  # bytes that never formed a character
            out[-1] += cur[len(shown):]
        return out


# ---------------------------------------------------------------------------------------------- results
@dataclass
class TextExplanation:
    """Relevance of each input token for one explained output.

    ``tokens``: the text each token contributes (see :meth:`Tokenizer.pieces`); ``relevance``: one score per
    token (sums to about ``score`` under AttnLRP); ``target``/``target_text``: the explained token id or class
    and its text/label; ``prediction_text``: what the model itself predicts there.
    """

    tokens: list[str]
    ids: list[int]
    relevance: np.ndarray
    score: float
    target: int | None = None
    target_text: str = ""
    prediction: int | None = None
    prediction_text: str = ""
    special: list[bool] = field(default_factory=list)
    title: str = ""

    def words(self) -> list[tuple[str, float]]:
        """Tokens merged into words (a new word starts at whitespace or a special token), relevance summed."""
        return merge_words(self.tokens, self.relevance, self.special)

    def to_dict(self) -> dict:
        return {
            "title": self.title, "score": float(self.score), "target": self.target, "target_text": self.target_text,
            "prediction": self.prediction, "prediction_text": self.prediction_text,
            "tokens": [{"text": t, "id": int(i), "relevance": float(r), "special": bool(s)}
                       for t, i, r, s in zip(self.tokens, self.ids, self.relevance, self._special())],
            "words": [{"text": w, "relevance": float(r)} for w, r in self.words()],
        }

    def _special(self) -> list[bool]:
        return self.special or [False] * len(self.tokens)


@dataclass
class GenerationExplanation:
    """Relevance of every input token (prompt and earlier generated tokens) for each generated token.

    ``matrix[j, i]``: relevance of token ``tokens[i]`` for generating ``generated[j]``, the token at sequence
    position ``len(prompt) + j``; entries right of the generating position are zero (causal model).
    """

    tokens: list[str]  # prompt tokens followed by generated tokens (the explained sequence)
    ids: list[int]
    n_prompt: int
    generated: list[str]
    generated_ids: list[int]
    matrix: np.ndarray  # (n_generated, n_prompt + n_generated)
    scores: np.ndarray  # logit of each generated token
    special: list[bool] = field(default_factory=list)

    def step(self, j: int) -> TextExplanation:
        """The explanation of generated token ``j`` alone, over the tokens before it."""
        n = self.n_prompt + j
        return TextExplanation(self.tokens[:n], self.ids[:n], self.matrix[j, :n], float(self.scores[j]),
                               self.generated_ids[j], self.generated[j], self.generated_ids[j], self.generated[j],
                               (self.special or [False] * len(self.tokens))[:n])

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens, "ids": [int(i) for i in self.ids], "n_prompt": self.n_prompt,
            "generated": self.generated, "generated_ids": [int(i) for i in self.generated_ids],
            "matrix": self.matrix.tolist(), "scores": self.scores.tolist(),
        }


def merge_words(tokens: Sequence[str], relevance: np.ndarray, special: Sequence[bool] | None = None
                ) -> list[tuple[str, float]]:
    """Join sub-word tokens into words; a word starts at a token beginning with whitespace, a special token,
    or the token after a special one. Relevance of the parts is summed."""
    special = list(special) if special else [False] * len(tokens)
    words: list[tuple[str, float]] = []
    for k, (t, r) in enumerate(zip(tokens, np.asarray(relevance, dtype=np.float64))):
        new = not words or special[k] or special[k - 1] or t[:1].isspace() or words[-1][0][-1:].isspace()
        if new:
            words.append((t, float(r)))
        else:
            words[-1] = (words[-1][0] + t, words[-1][1] + float(r))
    return words


# ---------------------------------------------------------------------------------------------- explainer
class TextExplainer:
    """Explain a text model (ONNX file with its tokenizer next to it) from strings and chats.

    model: path of the ``.onnx`` file (or its folder); ``tokenizer``: a :class:`Tokenizer`, a transformers
    tokenizer, or None to read the one next to the model. Other keyword arguments go to
    :class:`~onnx_lrp.Explainer` (``composite``, ``providers``, ...).
    """

    def __init__(self, model: str | os.PathLike | Explainer, composite: str | Any = "attnlrp", *,
                 tokenizer: Any = None, output: str | None = None, **kwargs: Any):
        if isinstance(model, Explainer):
            self.explainer = model
            folder = Path(model.graph.source).parent if model.graph.source.endswith(".onnx") else Path(".")
        else:
            path = Path(model).expanduser()
            folder = path if path.is_dir() else path.parent
            self.explainer = Explainer(path, composite, **kwargs)
        self.folder = folder
        if tokenizer is None:
            tokenizer = Tokenizer.from_folder(folder)
        elif not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.config = read_json(folder / "config.json")
        self.output = output or self.explainer.default_output
        self.kind = self._kind()
        self._check_vocabulary()

    def _check_vocabulary(self) -> None:
        """The tokenizer's ids fit the model's embedding table: none beyond it, and most of its rows used (a
        tokenizer of another model produces ids that are all valid rows, and the explanation would be nonsense;
        tables are padded by a few percent at most)."""
        rows = self.explainer._checks.table_rows("input_ids")
        n = self.tokenizer.vocab_size()
        if rows is None or (n <= rows and n >= _MIN_VOCAB_SHARE * rows):
            return
        raise ModelLoadError(
            f"{self.explainer.graph.source}: the tokenizer has {n} tokens, but the model's embedding table has "
            f"{rows} rows: it is not this model's tokenizer (pass the one it was trained with: tokenizer.json next "
            "to the model, TextExplainer(tokenizer=...), CLI --tokenizer DIR)")

    # ------------------------------------------------------------------ model kind, labels, targets
    def _kind(self) -> str:
        rank = _output_rank(self.explainer.graph.model, self.output)
        if rank == 3 and self.output == "logits":
            return "causal"
        if rank == 2:
            return "classifier"
        return "encoder"

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.config.get("id2label", {}).items()}

    def _label(self, idx: int) -> str:
        if self.kind == "causal":
            return self.tokenizer.decode([idx])
        return self.labels.get(idx, str(idx))

    def resolve_target(self, target: int | str | None) -> int | None:
        """A token string (causal LMs; must be one token) or label name (classifiers) -> its id."""
        if target is None or isinstance(target, (int, np.integer)):
            return None if target is None else int(target)
        if not isinstance(target, str):
            raise TargetError(f"target must be an int, a token string or a label name, got {type(target).__name__}")
        if self.kind == "causal":
            tid = self.tokenizer.token_id(target)
            if tid is not None:
                return int(tid)
            ids = self.tokenizer.encode(target, special=False)
            if len(ids) != 1:
                raise TargetError(
                    f"target {target!r} is {len(ids)} tokens {self.tokenizer.pieces(ids)}, not one; give a single "
                    "token (often with its leading space, e.g. ' Paris') or explain a generation span"
                )
            return ids[0]
        by_name = {v.lower(): k for k, v in self.labels.items()}
        if target.lower() in by_name:
            return by_name[target.lower()]
        if target.isdigit():
            return int(target)
        raise TargetError(f"unknown label {target!r}; the model's labels are {list(self.labels.values())}")

    # ------------------------------------------------------------------ inputs
    def encode(self, text: str | Chat, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a string, or of a chat (list of ``{"role", "content"}``; ``chat=True`` wraps a string
        as one user message) rendered with the model's chat template and a generation prompt."""
        if isinstance(text, str) and not chat:
            return self.tokenizer.encode(text)
        messages = [{"role": "user", "content": text}] if isinstance(text, str) else list(text)
        if system:
            messages = [{"role": "system", "content": system}] + messages
        return self.tokenizer.chat(messages)

    def _feeds(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        if not ids:
            raise InputError("the text encodes to no tokens")
        arr = np.asarray([ids], dtype=np.int64)
        return {"input_ids": arr, "attention_mask": np.ones_like(arr)} if "attention_mask" in \
            self.explainer.input_names else {"input_ids": arr}

    # ------------------------------------------------------------------ explanations
    def explain(self, text: str | Chat, target: int | str | None = None, *, chat: bool = False,
                system: str | None = None) -> TextExplanation:
        """Explain the model's output for ``text``: the next token (causal LMs) or a class (classifiers).

        target: None (the model's own prediction), an id, a token string (``" Paris"``) or a label name.
        """
        if self.kind == "encoder":
            raise TargetError(f"{self.explainer.graph.source}: output {self.output!r} is a hidden state; "
                              "use similarity() or Explainer(...).explain(output_relevance=...)")
        ids = self.encode(text, chat, system)
        tid = self.resolve_target(target)
        res = self.explainer.explain(self._feeds(ids), target=tid, output=self.output, full_output=False)
        y = res.outputs[self.output][0]  # the explained row only where the model's head allows (else every position)
        row = (y[0] if y.shape[0] == 1 else y[res.position[0]]) if y.ndim == 2 else y
        pred = int(np.argmax(row))
        tgt = int(res.target[0])
        return TextExplanation(
            tokens=self.tokenizer.pieces(ids), ids=list(ids), relevance=res.relevance["input_ids"][0],
            score=float(res.score[0]), target=tgt, target_text=self._label(tgt), prediction=pred,
            prediction_text=self._label(pred), special=self._special(ids),
            title=f"relevance for {'next token' if self.kind == 'causal' else 'class'} {self._label(tgt)!r}",
        )

    def generate(self, ids: Sequence[int], max_new_tokens: int = 10) -> list[int]:
        """Greedy continuation with onnxruntime (no cache: the whole sequence is run per step); stops at an
        end-of-sequence or other special token."""
        if self.kind != "causal":
            raise TargetError("generate() needs a causal language model (logits of shape (batch, seq, vocab))")
        stop = self._stop_ids()
        seq = list(ids)
        out: list[int] = []
        for _ in bar(range(max_new_tokens), "generating", total=max_new_tokens):
            logits = self.explainer.forward(self._feeds(seq), [self.output])[self.output]
            nxt = int(np.argmax(logits[0, -1]))
            out.append(nxt)
            seq.append(nxt)
            if nxt in stop:
                break
        return out

    def explain_generation(self, text: str | Chat, max_new_tokens: int = 10, *, chat: bool = False,
                           system: str | None = None, continuation: Sequence[int] | str | None = None,
                           chunk: int | None = None) -> GenerationExplanation:
        """Generate greedily (or take ``continuation``), then explain every generated token with ONE forward
        over prompt + continuation and all targets batched into one backward pass (``chunk``: at most this
        many targets per pass, to bound memory; each pass then repeats the forward)."""
        prompt = self.encode(text, chat, system)
        if continuation is None:
            gen = self.generate(prompt, max_new_tokens)
        elif isinstance(continuation, str):
            gen = self.tokenizer.encode(continuation, special=False)
        else:
            gen = [int(i) for i in continuation]
        if not gen:
            raise InputError("nothing was generated")
        seq = prompt + gen
        n_p, n_g = len(prompt), len(gen)
        feeds = self._feeds(seq[:-1])
        matrix = np.zeros((n_g, len(seq)), dtype=np.float64)
        scores = np.zeros(n_g)
        chunk = chunk or n_g
        for start in bar(range(0, n_g, chunk), "explaining generated tokens", total=-(-n_g // chunk)):
            js = np.arange(start, min(n_g, start + chunk))
            res = self.explainer.explain(feeds, target=np.asarray([gen])[:, js], position=(n_p - 1 + js)[None],
                                         output=self.output)
            matrix[js, : len(seq) - 1] = res.relevance["input_ids"][0]
            scores[js] = res.score[0]
        pieces = self.tokenizer.pieces(seq)
        return GenerationExplanation(pieces, seq, n_p, pieces[n_p:], gen, matrix, scores, self._special(seq))

    def similarity(self, a: str, b: str, *, pooling: str = "mean") -> tuple[TextExplanation, TextExplanation]:
        """Explain ``score = e(a) . e(b)``, the dot product of two pooled sentence embeddings.

        The score is bilinear; each sentence is explained with the other embedding held fixed: relevance on
        ``a`` explains ``e(a) . e(b)`` as a function of ``a`` (start weights ``w = pool * e(b)`` on the
        hidden states), and vice versa, so each side sums to (about) the full score.
        pooling: ``"mean"`` (mask-weighted mean over tokens, sentence-transformers' default), ``"cls"``, or
        ``"none"`` when the chosen output already is a pooled ``(batch, hidden)`` embedding.
        """
        if self.kind != "encoder" and pooling != "none":
            holds = "next-token logits (a causal LM)" if self.kind == "causal" else "class scores"
            raise TargetError(
                f"{self.explainer.graph.source}: similarity() compares sentence embeddings of an encoder, but output "
                f"{self.output!r} holds {holds}; use explain(), or TextExplainer(..., output=<hidden-state output>) "
                "for a model that has one")
        ex = self.explainer
        feeds = [self._feeds(self.tokenizer.encode(s)) for s in (a, b)]
        ys = [ex.forward(f, [self.output])[self.output] for f in feeds]
        pools = [_pool_weights(y, f.get("attention_mask"), pooling) for y, f in zip(ys, feeds)]
        emb = [(p * y).reshape(y.shape[0], -1, y.shape[-1]).sum(1)[0] for p, y in zip(pools, ys)]
        out = []
        for k, (f, p) in enumerate(zip(feeds, pools)):
            w = p * emb[1 - k]
            res = ex.explain(f, output=self.output, output_relevance=w.astype(np.float32))
            ids = f["input_ids"][0].tolist()
            out.append(TextExplanation(self.tokenizer.pieces(ids), ids, res.relevance["input_ids"][0],
                                       float(res.score[0]), special=self._special(ids),
                                       title=f"relevance for the similarity with {'b' if k == 0 else 'a'}"))
        return out[0], out[1]

    def _special(self, ids: Sequence[int]) -> list[bool]:
        sp = self.tokenizer.special_ids()
        return [int(i) in sp for i in ids]

    def _stop_ids(self) -> set[int]:
        stop = set()
        for cfg in (self.config, read_json(self.folder / "generation_config.json")):
            e = cfg.get("eos_token_id")
            stop.update(e if isinstance(e, list) else ([e] if e is not None else []))
        return stop | self.tokenizer.special_ids()


def _pool_weights(y: np.ndarray, mask: np.ndarray | None, pooling: str) -> np.ndarray:
    """Weights ``p`` with ``pooled = sum_s p[:, s] * y[:, s]`` broadcastable to ``y``."""
    if pooling == "none":
        if y.ndim != 2:
            raise TargetError(f"pooling='none' needs a (batch, hidden) output, got shape {y.shape}")
        return np.ones_like(y)
    if y.ndim != 3:
        raise TargetError(f"pooling {pooling!r} needs a (batch, seq, hidden) output, got shape {y.shape}")
    if pooling == "cls":
        p = np.zeros(y.shape[:2], dtype=np.float64)
        p[:, 0] = 1.0
    elif pooling == "mean":
        m = np.ones(y.shape[:2]) if mask is None else mask.astype(np.float64)
        p = m / np.clip(m.sum(-1, keepdims=True), 1e-9, None)
    else:
        raise ValueError(f"pooling must be 'mean', 'cls' or 'none', got {pooling!r}")
    return p[..., None]


def _output_rank(model: onnx.ModelProto, name: str) -> int | None:
    for o in model.graph.output:
        if o.name == name and o.type.tensor_type.HasField("shape"):
            return len(o.type.tensor_type.shape.dim)
    return None
