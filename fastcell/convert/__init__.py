"""Models from other frameworks: PyTorch modules (float and torch.ao dynamic quantized), state_dicts
and checkpoints, ONNX files, Keras models and .keras files. Each converter names what it reads with
fastcell.spec and builds the model with fastcell.models' registry; none is imported by `import
fastcell` until used."""
