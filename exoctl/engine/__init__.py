"""The torch engine: weights and tokens in, logits and text out, on one process.

Nothing here imports zmq, typer or rich: the network stays in the worker, the model only sees tensors.
"""
