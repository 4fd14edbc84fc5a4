"""Tests of the integer lowering rules (hyq_tvm.relax.integer), one file per rule."""
