"""Text and image front ends, visualisation and the CLI on tiny models (seconds).

The tiny Llama gets a word-level tokenizer (``tokenizers``) with a chat template; the tiny ViT is exported from
memory with :func:`onnx_lrp.exporters.export`. References: onnxruntime run directly (greedy generation),
PyTorch autograd (image gradient x input), hand-computed preprocessing, a PNG decoder written here.
"""
from __future__ import annotations

import json
import struct
import zlib
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest

from onnx_lrp import Explainer
from onnx_lrp.cli import main
from onnx_lrp.errors import TargetError
from onnx_lrp.visualize import colours, html_page, terminal, write_png

from _support import CACHE, tiny_model, word_level_folder

WORDS = ("the cat sat on mat dog ran to a big red house and then it was very happy sad . , ? "
         "hello world what is capital of france paris").split()
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def text_model():
    """Tiny random Llama (vocab 128) with a word-level tokenizer and chat template next to model.onnx."""
    path, vocab = word_level_folder("llama", "llama-text-frontend",
                                    ["<s>", "<unk>", "</s>", "<|user|>", "<|system|>", "<|assistant|>"], WORDS)
    folder = path.parent
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT, "eos_token": "</s>"}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "eos_token_id": 2}))
    return path, vocab


def test_text_explain_targets_and_tokens(text_model):
    from onnx_lrp.text import TextExplainer

    path, vocab = text_model
    tx = TextExplainer(path)
    assert tx.kind == "causal"
    res = tx.explain("the cat sat on the")
    ids = [vocab[w] for w in "the cat sat on the".split()]
    assert res.ids == ids and "".join(res.tokens).split() == "the cat sat on the".split()
    direct = Explainer(path).explain({"input_ids": np.array([ids])})
    np.testing.assert_allclose(res.relevance, direct.relevance["input_ids"][0], rtol=1e-6)
    assert res.target == res.prediction == int(direct.target[0])
    named = tx.explain("the cat sat on the", target="mat")
    assert named.target == vocab["mat"] and named.target_text.strip() == "mat"
    with pytest.raises(TargetError, match="2 tokens"):
        tx.explain("the cat", target="big house")
    assert [w for w, _ in res.words()] == res.tokens  # word-level tokens: every token is a word
    d = res.to_dict()
    assert [t["id"] for t in d["tokens"]] == ids and d["target"] == res.target


def test_chat_template_rendering(text_model):
    from onnx_lrp.text import TextExplainer

    path, vocab = text_model
    tx = TextExplainer(path)
    ids = tx.encode("hello world", chat=True, system="very happy")
    expected = "<|system|> very happy </s> <|user|> hello world </s> <|assistant|>".split()
    assert ids == [vocab[w] for w in expected]
    res = tx.explain([{"role": "user", "content": "what is the capital of france ?"}])
    assert res.special[0] and res.tokens[0] == "<|user|>"


def test_generation_span_matrix(text_model):
    import onnxruntime as ort

    from onnx_lrp.text import TextExplainer

    path, vocab = text_model
    tx = TextExplainer(path)
    prompt = [vocab[w] for w in "the big red house".split()]
    gen = tx.explain_generation("the big red house", max_new_tokens=4, chunk=3)
    # independent greedy decoding with a plain onnxruntime session
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seq = list(prompt)
    for _ in range(len(gen.generated_ids)):
        n = len(seq)
        out = sess.run(["logits"], {"input_ids": np.array([seq]), "attention_mask": np.ones((1, n), np.int64),
                                    "position_ids": np.arange(n)[None]})[0]
        seq.append(int(out[0, -1].argmax()))
    assert gen.ids == seq and gen.n_prompt == len(prompt)
    # each row of the batched matrix = a single-target explanation of that step
    full = np.array([seq[:-1]])
    for j, t in enumerate(gen.generated_ids):
        single = tx.explainer.explain({"input_ids": full}, target=t, position=len(prompt) - 1 + j)
        np.testing.assert_allclose(gen.matrix[j, :-1], single.relevance["input_ids"][0], rtol=1e-5, atol=1e-6)
        assert np.all(gen.matrix[j, len(prompt) + j:] == 0)
        assert gen.scores[j] == pytest.approx(float(single.score[0]), rel=1e-5)
    step = gen.step(1)
    assert len(step.tokens) == len(prompt) + 1 and step.target == gen.generated_ids[1]


# ---------------------------------------------------------------------------------------------- visualisation
def test_colours_are_diverging():
    c = colours(np.array([-2.0, 0.0, 1.0, 2.0]))
    assert tuple(c[1]) == (255, 255, 255)
    assert c[3][0] > c[3][2] and c[0][2] > c[0][0]  # positive red, negative blue
    assert c[2][1] > c[3][1]  # half the value: lighter


def test_terminal_and_html():
    toks, rel = ["<s>", "Hello", " wor", "ld", " <&>"], np.array([0.0, 1.0, -0.5, 0.25, 2.0])
    txt = terminal(toks, rel, color=True)
    assert "\x1b[48;2;" in txt and all(t in txt for t in toks)
    plain = terminal(toks, rel, color=False)
    assert "\x1b" not in plain and "[+2.00]" in plain and "[-0.50]" in plain
    page = html_page([{"tokens": toks, "relevance": rel, "special": [True, False, False, False, False],
                       "words": [("Hello", 1.0), (" world", -0.25)], "heading": "h"}])

    class Collect(HTMLParser):
        text, links = "", []

        def handle_data(self, data):
            self.text += data

        def handle_starttag(self, tag, attrs):
            self.links += [v for k, v in attrs if k in ("src", "href")]

    p = Collect()
    p.feed(page)
    assert all(link.startswith("data:") for link in p.links) and "<script" not in page  # no external assets
    assert "<s>Hello world <&>" in p.text  # sub-words joined back into the text, escaped safely


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n = struct.unpack(">I", data[pos: pos + 4])[0]
        kind, body = data[pos + 4: pos + 8], data[pos + 8: pos + 8 + n]
        crc = struct.unpack(">I", data[pos + 8 + n: pos + 12 + n])[0]
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = ihdr[0], ihdr[1]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert np.all(raw[:, 0] == 0)
    return raw[:, 1:].reshape(h, w, 3)


def test_write_png_roundtrip(tmp_path):
    img = np.random.RandomState(0).randint(0, 256, size=(7, 5, 3)).astype(np.uint8)
    np.testing.assert_array_equal(_read_png(write_png(tmp_path / "a.png", img)), img)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_inspect(text_model, tmp_path, capsys):
    path, _ = text_model
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Softmax" in out and "Gradient()" in out and "ConstantStatistic()" in out
    assert "all relevance-carrying ops have rules" in out
    # an op without a rule on the relevance path: non-zero exit and a summary naming it
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                                onnx.helper.make_node("Hardmax", ["h"], ["y"], name="hm")], "g", [x], [y], [w])
    bad = tmp_path / "bad.onnx"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(bad))
    assert main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "UNSUPPORTED" in out and "Hardmax: 1 node(s), e.g. hm" in out


def test_cli_explain_text(text_model, tmp_path, capsys):
    from onnx_lrp.text import TextExplainer

    path, _ = text_model
    html_f, json_f = tmp_path / "e.html", tmp_path / "e.json"
    assert main(["explain", str(path), "the cat sat on the", "--target", "mat", "--html", str(html_f),
                 "--json", str(json_f), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "mat" in out and "\x1b" not in out
    data = json.loads(json_f.read_text())
    ref = TextExplainer(path).explain("the cat sat on the", target="mat")
    np.testing.assert_allclose([t["relevance"] for t in data["tokens"]], ref.relevance, rtol=1e-6)
    assert html_f.read_text().startswith("<!DOCTYPE html>")
    assert main(["explain", str(path), "the cat", "--generate", "2", "--no-color", "--html", str(html_f)]) == 0
    assert "generated:" in capsys.readouterr().out and "<table" in html_f.read_text()


def test_cli_help_texts(capsys):
    for cmd in ([], ["export"], ["inspect"], ["explain"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main(cmd + ["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "onnx-lrp demo" in out and "--html FILE" in out and "--target" in out


# ---------------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def vit_model():
    """Tiny random ViT classifier (32x32 input), exported from memory with onnx_lrp.exporters.export."""
    root = CACHE / "vit-tiny-frontend"
    if not (root / "onnx" / "model.onnx").is_file():
        import torch
        from transformers import ViTConfig, ViTForImageClassification

        from onnx_lrp.exporters import export
        from _support import randomize_

        torch.manual_seed(0)
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, id2label={0: "cat", 1: "dog", 2: "car"},
                        label2id={"cat": 0, "dog": 1, "car": 2})
        model = ViTForImageClassification(cfg).eval()
        randomize_(model)
        model.save_pretrained(str(root / "pt"))
        export(model, root / "onnx", task="image-classification")
        (root / "onnx" / "preprocessor_config.json").write_text(json.dumps({
            "do_resize": True, "size": {"height": 32, "width": 32}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3],
            "image_std": [0.2, 0.25, 0.3], "image_processor_type": "ViTImageProcessor"}))
    return root


def test_image_preprocessing_by_hand():
    from onnx_lrp.image import Preprocessor, resize

    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 128, 250
    pre = Preprocessor(size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = pre.pixel_values(pre.resized(img))
    assert x.shape == (1, 3, 32, 32)
    for c, v in enumerate((10, 128, 250)):  # a flat image stays flat; (v/255 - mean)/std by hand
        np.testing.assert_allclose(x[0, c], (v / 255 - pre.mean[c]) / pre.std[c], rtol=1e-6)
    ramp = np.repeat(np.repeat(np.arange(0, 250, 50, dtype=np.uint8)[None, :, None], 3, 0), 3, 2)  # (3, 5, 3)
    out = resize(ramp, (3, 10))
    assert out.shape == (3, 10, 3) and np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # monotone ramp kept


def test_image_explainer_matches_autograd(vit_model, tmp_path):
    import torch
    from transformers import ViTForImageClassification

    from onnx_lrp.image import ImageExplainer

    ix = ImageExplainer(vit_model / "onnx" / "model.onnx", composite="gradient-x-input")
    img = np.random.RandomState(1).randint(0, 256, size=(48, 40, 3)).astype(np.uint8)
    res = ix.explain(img, target="dog")
    assert res.heatmap.shape == (32, 32) and res.target == 1 and res.label == "dog"
    model = ViTForImageClassification.from_pretrained(str(vit_model / "pt")).eval()
    x = torch.tensor(ix.preprocessor.pixel_values(res.image), requires_grad=True)
    logit = model(pixel_values=x).logits[0, 1]
    logit.backward()
    ref = (x * x.grad)[0].detach().numpy()
    assert res.score == pytest.approx(float(logit), rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(res.relevance, ref, atol=1e-5 * np.abs(ref).max() + 1e-7, rtol=1e-3)
    np.testing.assert_allclose(res.heatmap, ref.sum(0), atol=1e-4 * np.abs(ref).max())
    png = _read_png(res.save_png(tmp_path / "h.png", min_size=64))  # 32 px enlarged twice
    assert png.shape == (64, 64 * 3 + 8, 3)
    np.testing.assert_array_equal(png[::2, :64:2], res.image)
    # the CLI: an .npy image, default AttnLRP, PNG written
    np.save(tmp_path / "img.npy", img)
    assert main(["explain", str(vit_model / "onnx"), "--image", str(tmp_path / "img.npy"),
                 "--png", str(tmp_path / "cli.png")]) == 0
    assert _read_png(tmp_path / "cli.png").shape[0] == 224


def test_cli_export_with_prepare(tmp_path, capsys):
    pt_dir, _ = tiny_model("llama")
    out = tmp_path / "exported"
    assert main(["export", str(pt_dir), str(out), "--task", "text-generation", "--prepare"]) == 0
    path = out / "model.onnx"
    assert capsys.readouterr().out.strip() == str(path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "SimplifiedLayerNormalization" in ops and "Softmax" in ops and "Pow" not in ops
    assert (out / "config.json").is_file()
    ids = np.array([[5, 9, 17, 33]])
    ref = Explainer(tiny_model("llama")[1]).explain({"input_ids": ids})
    res = Explainer(path).explain({"input_ids": ids})
    np.testing.assert_allclose(res.relevance["input_ids"], ref.relevance["input_ids"], rtol=1e-4, atol=1e-6)


def test_python_dash_m():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "onnx_lrp", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "onnx-lrp" in proc.stdout and "inspect" in proc.stdout
