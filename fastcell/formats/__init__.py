"""The weight formats: float32 and float64 as NumPy holds them, and the reduced ones, int8 and
bf16 (reduced.py), which fastcell.quantize makes and the weight file stores."""
