"""Content: model views, state-dict transforms, adapters and model families, and what tensors mean
(no I/O, no policy).
"""
