"""Wire types: the protocol's frames and every typed message and field that crosses it. Torch-free."""
