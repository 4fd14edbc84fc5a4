"""QDQ Relax graphs lowered to integer arithmetic by a list of rules, one module per op family (gemm,
softmax, rescale and affine, norm, lookup, resize, pool, product), each with its pattern, its rewrite, its TIR kernel(s) and its numpy twin;
reference.py recomputes every recorded layer independently of them, from its real numbers (verify.py uses it)."""
from .driver import RULES, check_integer, integerize, integerize_layers, integerize_pass
from .rule import IntegerLayer, Rule

__all__ = ["RULES", "IntegerLayer", "Rule", "check_integer", "integerize", "integerize_layers", "integerize_pass"]
