"""Compiler side of the QuantPlan: Relax quantize/dequantize annotations lowered to an integer graph."""
from .integer import check_integer, integerize

__all__ = ["check_integer", "integerize"]
