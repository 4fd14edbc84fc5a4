"""hyq-tvm: Q-HyViT post-training quantization of hybrid ViTs, compiled with Apache TVM for ARM."""

__version__ = "0.1.0"
