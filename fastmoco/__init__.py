"""fastmoco: fast MoCo v3 pretraining of Vision Transformers."""
__version__ = "0.1.0"
