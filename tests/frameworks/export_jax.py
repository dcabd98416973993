"""Export a tiny transformers model with JAX/Flax + jax2onnx (runs inside the JAX venv, see requirements-jax.txt).

    python export_jax.py PT_DIR MODEL_CLASS OUT.onnx NORMALIZATION INPUT_NAME [INPUT_NAME ...]

``PT_DIR`` is a PyTorch ``save_pretrained`` folder. Its weights (read as numpy, no torch) are converted to the
parameters of transformers' Flax class ``MODEL_CLASS`` with ``convert_pytorch_state_dict_to_flax``, and
``logits = model.module.apply(params, *inputs)`` is traced by jax2onnx with int32 inputs of a fixed shape :data:`SHAPE`.
``NORMALIZATION`` is jax2onnx's ``normalization_mode`` (``auto``: norms it recognises become ONNX norm ops;
``force_decomposed``: written out as JAX computes them, variance as ``E[x^2] - E[x]^2``).
"""
from __future__ import annotations

import inspect
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax2onnx  # noqa: E402
import onnx  # noqa: E402

OPSET = 18
# fixed (batch, seq): with symbolic dims transformers' Flax code fails inside jnp.arange(seq) / broadcast_to
SHAPE = (2, 9)


def flax_model(pt_dir: str, model_cls: str):
    import transformers
    from safetensors.numpy import load_file
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    config = transformers.AutoConfig.from_pretrained(pt_dir)
    model = getattr(transformers, model_cls)(config, _do_init=True, seed=0)
    state = load_file(os.path.join(pt_dir, "model.safetensors"))
    params = convert_pytorch_state_dict_to_flax(state, model)
    return model, jax.tree_util.tree_map(jnp.asarray, params)


def main(pt_dir: str, model_cls: str, out: str, normalization: str, names: list[str]) -> None:
    model, params = flax_model(pt_dir, model_cls)
    module = model.module
    accepts = inspect.signature(type(module).__call__).parameters
    extra = {}
    if "head_mask" in accepts:
        # transformers' Flax wrapper casts the head mask to int32 (jnp.array(head_mask, dtype="i4")) and jax2onnx
        # writes the int x float einsum without JAX's type promotion (onnxruntime refuses the file): call the
        # module itself with a float32 head mask
        cfg = model.config
        extra["head_mask"] = jnp.ones((cfg.num_hidden_layers, cfg.num_attention_heads), jnp.float32)
    if "position_ids" in accepts and "position_ids" not in names:
        extra["position_ids"] = jnp.broadcast_to(jnp.arange(SHAPE[1], dtype=jnp.int32), SHAPE)
    if "token_type_ids" in accepts and "token_type_ids" not in names:
        extra["token_type_ids"] = jnp.zeros(SHAPE, jnp.int32)

    def logits(*tensors):
        return module.apply({"params": params}, **dict(zip(names, tensors)), **extra, deterministic=True).logits

    spec = [jax.ShapeDtypeStruct(SHAPE, jnp.int32) for _ in names]
    proto = jax2onnx.to_onnx(logits, spec, opset=OPSET, input_names=names, output_names=["logits"],
                             normalization_mode=normalization)
    onnx.save(proto, out)
    print(json.dumps({"out": out, "jax": jax.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
