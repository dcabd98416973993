"""Independent references to check onnx-lrp against, on the PyTorch original of a model (optional: they need torch
and transformers, ``pip install 'onnx-lrp[validate]'``; the rest of onnx-lrp never imports this package).

* :mod:`onnx_lrp.reference.torch`: this project's AttnLRP written with torch autograd (modified gradients on one
  loaded model), for any family it is checked on;
* :mod:`onnx_lrp.reference.lxt`: LXT 2.1, the AttnLRP authors' engine, in a worker process (the families it has
  patches for);
* :mod:`onnx_lrp.reference.recurrent`: the ONNX LSTM/GRU/RNN equations with this project's recurrent rules, in
  torch autograd (also on torch's ``nn.LSTM``/``nn.GRU``/``nn.RNN`` weights).

:mod:`onnx_lrp.validate` uses LXT where it supports the family, else the torch reference.
"""
