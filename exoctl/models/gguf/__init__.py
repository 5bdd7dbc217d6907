"""GGUF, torch-free: the file and its tensor table (`file`), a card from its header (`card`), the
Hub's `REPO:QUANT` names (`hub`). The engine reads the tensors themselves (`engine.gguf_weights`).
"""
