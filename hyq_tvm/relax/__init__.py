"""Compiler side of the QuantPlan: Relax quantize/dequantize annotations lowered to an integer graph."""
import tvm

from ..errors import HyqError
from .integer import check_integer, integerize

tvm.error.register_error(HyqError)  # a HyqError raised inside a TVM pass leaves the pass as itself, not RuntimeError

__all__ = ["check_integer", "integerize"]
