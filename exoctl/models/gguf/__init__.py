"""GGUF in one place: the file and its tensor table (`file`), a card from its header (`card`), the
Hub's `REPO:QUANT` names (`hub`) — all torch-free — and the engine's tensor reader (`weights`, torch).
"""
