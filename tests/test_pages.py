"""What a person sees: the HTML page and the terminal output (issue 15, item 7).

Readable chips (the text colour with the higher WCAG contrast on every colour of the scale, checked in a real
headless browser when Debian's ``chromium`` is installed), headings that do not repeat, "similarity" on pair pages,
characters split over byte-level tokens shown whole, the scores offered as a JSON download, and a terminal
generation matrix that neither cuts tokens nor overflows the terminal.
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from onnx_lrp.cli import main
from onnx_lrp.visualize import PART, colours, html_page, ink, terminal, terminal_matrix, width

from _support import word_level_folder
from test_frontends import text_model  # noqa: F401 - the tiny Llama with a word-level tokenizer (a fixture)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _contrast(a, b) -> float:
    def lum(c):
        c = np.asarray(c, dtype=np.float64) / 255
        return float(np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4) @ [0.2126, 0.7152, 0.0722])
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


class _Page(HTMLParser):
    """Text of headings/subtitles, chips (text, style, title) and links of a page."""

    def __init__(self, page: str):
        super().__init__()
        self.heads, self.chips, self.links, self._tag = [], [], [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k == "href"]
        if tag in ("h1", "h2") or (tag == "p" and a.get("class") == "meta"):
            self._tag = ["head", ""]
        elif tag == "span" and "tok" in a.get("class", ""):
            self._tag = ["chip", "", a]

    def handle_data(self, data):
        if self._tag:
            self._tag[1] += data

    def handle_endtag(self, tag):
        if self._tag and tag in ("h1", "h2", "p", "span"):
            if self._tag[0] == "head":
                self.heads.append(self._tag[1])
            else:
                self.chips.append((self._tag[1], self._tag[2]))
            self._tag = None


def test_ink_contrast_on_every_colour_of_the_scale():
    scale = colours(np.linspace(-1, 1, 201), 1.0)
    ratios = [_contrast(c, ink(c)) for c in scale]
    assert min(ratios) >= 4.5  # WCAG AA for normal text on every background of the scale
    assert ink(colours(np.array([1.0]), 1.0)[0]) == (255, 255, 255)  # strong red: white text
    assert ink(colours(np.array([-1.0]), 1.0)[0]) == (255, 255, 255)  # strong blue: white text
    assert ink((255, 255, 255)) == (0, 0, 0)


def test_chips_and_cells_carry_their_text_colour():
    toks, rel = ["a", " strong", " weak", ""], np.array([0.1, 2.0, -0.2, 0.05])
    page = _Page(html_page([{"tokens": toks, "relevance": rel, "words": [(" strong", 2.0)],
                             "matrix": np.array([rel]), "outputs": ["x"]}]))
    styles = {text: a["style"] for text, a in page.chips}
    assert "color:rgb(255,255,255)" in styles[" strong"] and "color:rgb(0,0,0)" in styles["a"]
    assert styles[PART].startswith("background")  # an empty piece: a faint dot, its score in the title
    assert any("byte-level piece" in a["title"] for _, a in page.chips)
    txt = terminal(toks, rel, color=True)
    assert "\x1b[48;2;178;24;43m\x1b[38;2;255;255;255m strong" in txt


def _byte_level_tokenizer(folder):
    """A tiny byte-level BPE (GPT-2 style) that splits emoji and CJK characters over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>"])
    tok.train_from_iterator(["I love pizza in Paris, the capital of France"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))


def test_characters_split_over_tokens_are_shown_whole(tmp_path):
    from onnx_lrp.text import Tokenizer

    _byte_level_tokenizer(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)
    text = "I love 🍕 pizza, 日本 🇫🇷!"
    ids = tok.encode(text)
    pieces = tok.pieces(ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(text.split())  # the emoji and CJK characters take several byte tokens
    assert "🍕" in "".join(p for p in pieces if len(p) <= 2) and "" in pieces  # one token holds the character
    page = html_page([{"tokens": pieces, "relevance": np.linspace(-1, 1, len(pieces))}])
    assert "🍕" in page and "\ufffd" not in page and page.count(f">{PART}<") == pieces.count("")


def test_cli_page_headings_and_json_download(text_model, tmp_path, capsys):  # noqa: F811
    html_f, json_f = tmp_path / "e.html", tmp_path / "e.json"
    assert main(["explain", str(text_model[0]), "the cat sat on the", "--target", "mat", "--html", str(html_f),
                 "--json", str(json_f)]) == 0
    capsys.readouterr()
    page = _Page(html_f.read_text(encoding="utf-8"))
    heads = [h for h in page.heads if not h.startswith("Made with")]
    assert len(set(heads)) == len(heads) == 4  # title, section heading, subtitle, words table: all different
    assert sum("logit" in h for h in heads) == 1  # the score said once
    data = [ln for ln in page.links if ln.startswith("data:application/json;base64,")]
    assert len(data) == 1
    assert json.loads(base64.b64decode(data[0].split(",", 1)[1])) == json.loads(json_f.read_text())


@pytest.fixture(scope="module")
def encoder_folder():
    """Tiny random BERT (feature extraction) with a word-level tokenizer: an encoder for pair similarity."""
    path, _ = word_level_folder("bert_feat", "bert-feat-pages", ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                "a man is eating food eats bread .".split())
    return path.parent


def test_pair_page_says_similarity(encoder_folder, tmp_path, capsys):
    html_f, json_f = tmp_path / "p.html", tmp_path / "p.json"
    assert main(["explain", str(encoder_folder), "a man is eating food", "--pair", "a man eats bread", "--html",
                 str(html_f), "--json", str(json_f)]) == 0
    out = capsys.readouterr().out
    page = _Page(html_f.read_text(encoding="utf-8"))
    assert "similar" in page.heads[0] and all("logit" not in h and "predicts" not in h for h in page.heads)
    assert sum("similarity" in h for h in page.heads) == 2  # both sentences on one page
    data = json.loads(json_f.read_text())
    assert set(data) == {"similarity", "a", "b"} and f"{data['similarity']:.4g}" in out
    assert not (tmp_path / "p-b.html").exists()


def test_terminal_matrix_keeps_tokens_and_fits_the_terminal():
    inputs = ["<|im_start|>", "The", " extraordinarily", " long", "日本語", "\n"] * 3
    outputs = [" Paris", "."]
    m = np.random.RandomState(0).randn(2, len(inputs))
    txt = terminal_matrix(inputs, outputs, m, color=True, columns=60)
    plain = ANSI.sub("", txt)
    assert max(width(ln) for ln in plain.splitlines() if not ln.startswith(" extraord")) <= 60
    assert "<|im_start|>" in plain and "日本語" in plain and "\\n" in plain  # shown whole (12 columns at most)
    assert "~1 = ' extraordinarily'" in plain  # longer tokens abbreviated, spelt out in a legend
    assert plain.count(" Paris") >= 2  # wrapped into blocks, each with its rows
    strongest = np.unravel_index(np.abs(m[0]).argmax(), m[0].shape)[0]
    assert f"\x1b[38;2;255;255;255m{m[0, strongest]:+.2f}" in txt  # white on the row's strongest colour


def test_terminal_matrix_narrower_than_its_abbreviations():
    """A ``max_width`` below the length of an abbreviation mark (``~1``) still gives a matrix (it looped forever)."""
    import signal

    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("terminal_matrix did not return"))
    signal.alarm(10)
    try:
        txt = terminal_matrix(["abc", "defgh"], ["xyz"], np.ones((1, 2)), color=False, max_width=1)
    finally:
        signal.alarm(0)
    assert "~1 = 'abc'" in txt and "~2 = 'defgh'" in txt


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_page_in_a_headless_browser(tmp_path):
    """Rendered by chromium: the strongest chip is red with white text, a pale chip has dark text."""
    from PIL import Image

    page = html_page([{"tokens": ["MMMM", " mmmm"], "relevance": np.array([1.0, 0.05])}])
    page = page.replace("font-size:1.1em", "font-size:4em")  # large glyphs: enough text pixels to count
    page = page.replace("</style>", ".legend{display:none}</style>")  # its colour bar ends in the same red
    (tmp_path / "p.html").write_text(page, encoding="utf-8")
    shot = tmp_path / "p.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=900,500", f"file://{tmp_path / 'p.html'}"],
                   capture_output=True, timeout=120, check=False)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = np.all(np.abs(img - [178, 24, 43]) <= 2, axis=-1)
    assert red.sum() > 500, "no strong red chip rendered"
    ys, xs = np.nonzero(red)
    chip = img[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    light = np.all(chip >= 230, axis=-1).sum()
    dark = np.all(chip <= 40, axis=-1).sum()
    assert light > 50 and dark == 0  # white glyphs on the red chip, no black ones
