"""Export a tiny transformers model with TensorFlow + tf2onnx (runs inside the TF venv, see requirements-tf.txt).

    python export_tf.py PT_DIR MODEL_CLASS OUT.onnx INPUT_NAME [INPUT_NAME ...]

``PT_DIR`` is a PyTorch ``save_pretrained`` folder (config.json + model.safetensors). The weights are loaded into
transformers' TF class ``MODEL_CLASS`` without torch (``load_pytorch_state_dict_in_tf2_model`` on the numpy
state dict), and a ``tf.function`` returning the logits is converted with an int32 ``input_signature`` (batch and
sequence dynamic) at opset 17.
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


def main(pt_dir: str, model_cls: str, out: str, names: list[str]) -> None:
    import onnx
    from onnx import numpy_helper

    model = transformers_model(pt_dir, model_cls)
    spec = [tf.TensorSpec((None, None), tf.int32, name=n) for n in names]

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
