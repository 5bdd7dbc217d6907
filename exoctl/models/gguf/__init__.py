"""GGUF, torch-free: the file and its tensor table (`file`), what it means in Hugging Face's terms
(`hf_names`: the config it implies, which tensor holds which), a card from its header (`card`), the
Hub's `REPO:QUANT` names (`hub`). The engine reads the tensors themselves (`engine.gguf_weights`).
"""
