"""Quantization: int8/fp8 quantized training of the dense projections (qt.py, through qwix) and
post-training int8/int4 quantization of a workdir's parameters (ptq.py, store.py)."""
