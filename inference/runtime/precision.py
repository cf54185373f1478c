"""The precisions a model version's weights can be built in (see quantize.py), named
without importing torch."""

QUANTIZE_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)  # int4 group sizes; a layer's input size must be a multiple
