"""Decoders: image codes [n, L] on an (h, w) grid -> uint8 RGB images [n, H, W, 3]."""
