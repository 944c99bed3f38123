"""``ckpt convert`` pipeline: planning which tensors meet, where each is read from, and the
streaming conversion.
"""
