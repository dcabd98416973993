"""Export a tiny transformers model with TensorFlow + tf2onnx (runs inside the TF venv, see requirements-tf.txt).

    python export_tf.py PT_DIR MODEL_CLASS OUT.onnx INPUT_NAME [INPUT_NAME ...]

``PT_DIR`` is a PyTorch ``save_pretrained`` folder (config.json + model.safetensors). The weights are loaded into
transformers' TF class ``MODEL_CLASS`` without torch (``load_pytorch_state_dict_in_tf2_model`` on the numpy
state dict), and a ``tf.function`` returning the logits is converted with an int32 ``input_signature`` (batch and
sequence dynamic) at opset 17. ``MODEL_CLASS`` = ``keras-block``: instead a small Keras transformer block of plain
layers (:func:`keras_block`), random weights, also written to ``OUT.npz`` for the reference.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

OPSET = 17


def transformers_model(pt_dir: str, model_cls: str):
    import transformers
    from safetensors.numpy import load_file
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

    config = transformers.AutoConfig.from_pretrained(pt_dir)
    model = getattr(transformers, model_cls)(config)
    state = load_file(os.path.join(pt_dir, "model.safetensors"))
    dummy = {"input_ids": tf.constant([[3, 4, 5]], tf.int32)}
    model(dummy)  # builds the variables
    load_pytorch_state_dict_in_tf2_model(model, state, allow_missing_keys=False)
    return model


def keras_block(seed: int = 0):
    """Embedding -> MultiHeadAttention(4 heads of 8) + residual -> LayerNormalization -> Dense(64, tanh GELU) ->
    Dense(32) + residual -> LayerNormalization -> masked mean -> Dense(3); norms and biases randomised. Returns the
    logits function of (input_ids, attention_mask) and the weights by layer."""
    import tf_keras as keras

    tf.random.set_seed(seed)
    layers = keras.layers
    tok = layers.Embedding(128, 32)
    mha = layers.MultiHeadAttention(num_heads=4, key_dim=8)
    ln1, ln2 = layers.LayerNormalization(epsilon=1e-5), layers.LayerNormalization(epsilon=1e-5)
    ff1 = layers.Dense(64, activation=lambda x: tf.nn.gelu(x, approximate=True))
    ff2, head = layers.Dense(32), layers.Dense(3)

    def logits(ids, mask):
        h = tok(ids)
        keys = tf.cast(mask, tf.bool)[:, None, :]
        h = ln1(h + mha(h, h, attention_mask=tf.tile(keys, [1, tf.shape(ids)[1], 1])))
        h = ln2(h + ff2(ff1(h)))
        m = tf.cast(mask, h.dtype)[..., None]
        return head(tf.reduce_sum(h * m, 1) / tf.reduce_sum(m, 1))

    logits(tf.constant([[3, 4, 5]]), tf.constant([[1, 1, 1]]))  # builds the weights
    rng = np.random.RandomState(seed)
    named = {"tok": tok, "mha": mha, "ln1": ln1, "ln2": ln2, "ff1": ff1, "ff2": ff2, "head": head}
    for name, layer in named.items():
        values = layer.get_weights()
        for k, v in enumerate(values):
            if name.startswith("ln"):
                values[k] = (1.0 if k == 0 else 0.0) + 0.3 * rng.randn(*v.shape)
            elif v.ndim == 1 or (name == "mha" and k % 2 == 1):  # biases (MultiHeadAttention's are (heads, dim))
                values[k] = 0.1 * rng.randn(*v.shape)
        layer.set_weights([np.asarray(v, np.float32) for v in values])
    weights = {f"{name}.{k}": v for name, layer in named.items() for k, v in enumerate(layer.get_weights())}
    return logits, weights


def main(pt_dir: str, model_cls: str, out: str, names: list[str]) -> None:
    import onnx
    from onnx import numpy_helper

    spec = [tf.TensorSpec((None, None), tf.int32, name=n) for n in names]
    if model_cls == "keras-block":
        block, weights = keras_block()
        np.savez(out[: -len(".onnx")] + ".npz", **weights)

        @tf.function(input_signature=spec)
        def logits(*tensors):
            return {"logits": block(*tensors)}
    else:
        model = transformers_model(pt_dir, model_cls)

        @tf.function(input_signature=spec)
        def logits(*tensors):
            return {"logits": model(dict(zip(names, tensors)), training=False).logits}

    proto, _ = tf2onnx.convert.from_function(logits, input_signature=spec, opset=OPSET)
    # constants the function captured as eager tensors (TF Mistral's rotary inv_freq) stay graph inputs: make
    # them initializers, as they are in the TF function
    captured = {inner.name: outer.numpy() for outer, inner in logits.get_concrete_function().graph.captures
                if outer.dtype != tf.resource}
    extra = [i for i in proto.graph.input if i.name not in names]
    missing = [i.name for i in extra if i.name not in captured]
    if missing:
        raise SystemExit(f"tf2onnx left inputs {missing} that are no captured constant")
    for i in extra:
        proto.graph.input.remove(i)
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(captured[i.name]), i.name))
    onnx.save(proto, out)
    print(json.dumps({"out": out, "tf": tf.__version__, "tf2onnx": tf2onnx.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
