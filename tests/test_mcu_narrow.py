"""Constants of a static graph narrowed (hyq_tvm.mcu.narrow): hand-written kernels before and after, the kernels still
computing the same values, and the small integer model smaller and still bit-exact in C."""
import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from hyq_tvm.mcu import cgraph
from hyq_tvm.mcu.cgraph import Grid, StaticGraph, Step, Value
from hyq_tvm.mcu.emit import write_c_folder
from hyq_tvm.mcu.kernels import kernel_source
from hyq_tvm.mcu.narrow import narrow_constants

from test_mcu_graph import _host_check, _small_graph

GRID = Grid((1.0,), (0,), 1)


def _graph(kernels: dict, steps: list[tuple[str, tuple[str, ...]]], constants: dict[str, np.ndarray]) -> StaticGraph:
    """A graph of `kernels` called as `steps` (kernel, args: inputs then one output), input x and output y (int64
    (4,)), intermediates t*."""
    values = {name: Value(name, data.shape, str(data.dtype), data) for name, data in constants.items()}
    for _, args in steps:
        values.update({a: Value(a, (4,), "int64") for a in args if a not in values})
    return StaticGraph(tvm.IRModule(kernels), values,
                       [Step(kernel, args, 1) for kernel, args in steps], "x", "y", {}, GRID, GRID)


def _call(func, *arrays: np.ndarray) -> np.ndarray:
    """`func`'s output (int64 (4,), its last parameter) for these inputs, built for the host."""
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.tensor(np.zeros(4, np.int64))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


@T.prim_func(private=True, s_tir=True)
def scaled(x: T.Buffer((4,), "int64"), p: T.Buffer((4,), "int64"), y: T.Buffer((4,), "int64")):
    for i in range(4):
        with T.sblock("y"):
            v = T.axis.remap("S", [i])
            T.reads(x[v], p[v])
            T.writes(y[v])
            y[v] = x[v] * p[v]


def test_an_int64_constant_that_fits_int32_is_stored_as_int32_and_loads_cast_back():
    @T.prim_func(private=True, s_tir=True)
    def expected(x: T.Buffer((4,), "int64"), p: T.Buffer((4,), "int32"), y: T.Buffer((4,), "int64")):
        for i in range(4):
            with T.sblock("y"):
                v = T.axis.remap("S", [i])
                T.reads(x[v], p[v])
                T.writes(y[v])
                y[v] = x[v] * T.Cast("int64", p[v])

    data = np.array([1, -2, 3, 2**31 - 1], np.int64)
    graph = narrow_constants(_graph({"k": scaled}, [("k", ("x", "c", "y"))], {"c": data}))
    tvm.ir.assert_structural_equal(graph.kernels["k"], expected)
    (name,) = [n for n in graph.steps[0].args if graph.values[n].data is not None]
    value = graph.values[name]
    assert (value.dtype, value.shape) == ("int32", (4,)) and "c" not in graph.values
    x = np.array([5, -7, 11, 2], np.int64)
    np.testing.assert_array_equal(_call(graph.kernels["k"], x, value.data), _call(scaled, x, data))


def test_a_parameter_one_call_needs_wide_is_not_narrowed():
    wide, small = np.array([1, 2, 3, 2**40 + 1], np.int64), np.array([1, 2, 3, 4], np.int64)
    before = _graph({"k": scaled}, [("k", ("x", "a", "t0")), ("k", ("t0", "b", "y"))], {"a": small, "b": wide})
    graph = narrow_constants(before)
    tvm.ir.assert_structural_equal(graph.kernels["k"], scaled)
    assert graph.steps == before.steps and all(graph.values[n] is v for n, v in before.values.items())


def test_values_that_share_a_power_of_two_are_stored_divided_by_it():
    @T.prim_func(private=True, s_tir=True)
    def expected(x: T.Buffer((4,), "int64"), p: T.Buffer((4,), "int8"), y: T.Buffer((4,), "int64")):
        for i in range(4):
            with T.sblock("y"):
                v = T.axis.remap("S", [i])
                T.reads(x[v], p[v])
                T.writes(y[v])
                y[v] = x[v] * (T.Cast("int64", p[v]) * T.int64(2**32))

    data = np.array([2**32, -(2**33), 3 * 2**32, 0], np.int64)
    graph = narrow_constants(_graph({"k": scaled}, [("k", ("x", "c", "y"))], {"c": data}))
    tvm.ir.assert_structural_equal(graph.kernels["k"], expected)
    value = graph.values[graph.steps[0].args[1]]
    np.testing.assert_array_equal(value.data, np.array([1, -2, 3, 0], np.int8))
    x = np.array([5, -7, 11, 2], np.int64)
    np.testing.assert_array_equal(_call(graph.kernels["k"], x, value.data), _call(scaled, x, data))


def test_a_value_repeated_is_passed_as_one_element_each_call_its_own():
    @T.prim_func(private=True, s_tir=True)
    def expected(x: T.Buffer((4,), "int64"), p: T.Buffer((1,), "int8"), y: T.Buffer((4,), "int64")):
        for i in range(4):
            with T.sblock("y"):
                v = T.axis.remap("S", [i])
                T.reads(x[v], p[0])
                T.writes(y[v])
                y[v] = x[v] * T.Cast("int64", p[0])

    five, seven = np.full(4, 5, np.int64), np.full(4, -7, np.int64)
    graph = narrow_constants(_graph({"k": scaled}, [("k", ("x", "a", "t0")), ("k", ("t0", "b", "y"))],
                                    {"a": five, "b": seven}))
    tvm.ir.assert_structural_equal(graph.kernels["k"], expected)
    assert [graph.values[s.args[1]].data.tolist() for s in graph.steps] == [[5], [-7]]
    assert all(graph.values[s.args[1]].shape == (1,) for s in graph.steps)


def test_a_value_the_same_in_every_call_is_held_by_the_kernel():
    @T.prim_func(private=True, s_tir=True)
    def expected(x: T.Buffer((4,), "int64"), y: T.Buffer((4,), "int64")):
        for i in range(4):
            with T.sblock("y"):
                v = T.axis.remap("S", [i])
                T.reads(x[v])
                T.writes(y[v])
                y[v] = x[v] * T.int64(-3)

    three = np.full(4, -3, np.int64)
    graph = narrow_constants(_graph({"k": scaled}, [("k", ("x", "a", "t0")), ("k", ("t0", "b", "y"))],
                                    {"a": three, "b": three.copy()}))
    tvm.ir.assert_structural_equal(graph.kernels["k"], expected)
    assert [s.args for s in graph.steps] == [("x", "t0"), ("t0", "y")]
    assert not any(v.data is not None for v in graph.values.values())


def test_an_unread_parameter_is_dropped_from_the_kernel_and_its_calls():
    @T.prim_func(private=True, s_tir=True)
    def before(x: T.Buffer((4,), "int64"), u: T.Buffer((4,), "int32"), y: T.Buffer((4,), "int64")):
        for i in range(4):
            with T.sblock("y"):
                v = T.axis.remap("S", [i])
                T.reads(x[v])
                T.writes(y[v])
                y[v] = x[v] + T.int64(1)

    @T.prim_func(private=True, s_tir=True)
    def expected(x: T.Buffer((4,), "int64"), y: T.Buffer((4,), "int64")):
        for i in range(4):
            with T.sblock("y"):
                v = T.axis.remap("S", [i])
                T.reads(x[v])
                T.writes(y[v])
                y[v] = x[v] + T.int64(1)

    graph = narrow_constants(_graph({"k": before}, [("k", ("x", "u", "y"))], {"u": np.arange(4, dtype=np.int32)}))
    tvm.ir.assert_structural_equal(graph.kernels["k"], expected)
    assert graph.steps[0].args == ("x", "y") and "u" not in graph.values


def test_a_value_two_kernels_need_in_different_forms_is_split():
    shared, wide = np.array([1, 2, 3, 4], np.int64), np.array([300, 2, 3, 4], np.int64)
    graph = narrow_constants(_graph({"k": scaled, "m": scaled.with_attr("hyq.copy", 1)},
                                    [("k", ("x", "s", "t0")), ("m", ("t0", "s", "t1")), ("m", ("t1", "w", "y"))],
                                    {"s": shared, "w": wide}))
    assert graph.kernels["k"].params[1].dtype == "int8" and graph.kernels["m"].params[1].dtype == "int16"
    k, m, m2 = (graph.values[s.args[1]] for s in graph.steps)
    assert (k.dtype, m.dtype, m2.dtype) == ("int8", "int16", "int16") and k.name != m.name != m2.name
    np.testing.assert_array_equal(k.data, shared)
    np.testing.assert_array_equal(m.data, shared)
    assert "s" not in graph.values and "w" not in graph.values


def test_equal_constants_are_passed_as_one_value():
    data = np.array([1, 2, 3, 2**40], np.int64)
    graph = narrow_constants(_graph({"k": scaled}, [("k", ("x", "a", "t0")), ("k", ("t0", "b", "y"))],
                                    {"a": data, "b": data.copy()}))
    assert graph.steps[0].args[1] == graph.steps[1].args[1] == "a" and "b" not in graph.values


def test_the_narrowed_small_model_is_smaller_and_bit_exact_in_c(tmp_path, monkeypatch):
    mod = _small_graph(4)
    graph = cgraph.static_graph(mod)
    monkeypatch.setattr(cgraph, "narrow_constants", lambda g: g)
    wide = cgraph.static_graph(mod)
    weights = lambda g: sum(v.nbytes for v in g.values.values() if v.data is not None)   # noqa: E731
    assert weights(graph) < weights(wide) and len(graph.values) < len(wide.values)
    assert sum(map(len, (s.args for s in graph.steps))) < sum(map(len, (s.args for s in wide.steps)))
    assert {v.dtype for v in graph.values.values() if v.data is not None} >= {"int8", "int16"}
    write_c_folder(tmp_path, graph, kernel_source(graph.kernels), "block-narrow")
    passed = {a for s in graph.steps for a in s.args}   # equal DLTensors (same arena bytes, dtype, rank) written once
    assert (tmp_path / "hyq_model.c").read_text().count(" DLTensor hyq_t_") < len(passed)
    _host_check(mod, tmp_path)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_constants_already_narrowest_or_not_signed_integers_stay(dtype):
    @T.prim_func(private=True, s_tir=True)
    def before(x: T.Buffer((4,), "int64"), p: T.Buffer((4,), dtype), y: T.Buffer((4,), "int64")):
        for i in range(4):
            with T.sblock("y"):
                v = T.axis.remap("S", [i])
                T.reads(x[v], p[v])
                T.writes(y[v])
                y[v] = x[v] * T.Cast("int64", p[v])

    start = _graph({"k": before}, [("k", ("x", "c", "y"))], {"c": np.array([1, 2, 3, 4], dtype)})
    graph = narrow_constants(start)
    tvm.ir.assert_structural_equal(graph.kernels["k"], before)
    assert all(graph.values[n] is v for n, v in start.values.items())


def test_a_constant_an_extern_call_reads_through_a_matched_buffer_stays():
    @T.prim_func(private=True, s_tir=True)
    def before(x: T.Buffer((4,), "int64"), p: T.Buffer((4,), "int64"), y: T.Buffer((4,), "int64")):
        with T.sblock("y"):
            T.reads(x[0:4], p[0:4])
            T.writes(y[0:4])
            w = T.match_buffer(p[0:4], (4,), "int64", offset_factor=1)
            T.evaluate(T.call_extern("int32", "f", x.data, T.tvm_access_ptr(T.type_annotation("int64"), w.data,
                                                                             w.elem_offset, 4, 1), y.data))

    start = _graph({"k": before}, [("k", ("x", "c", "y"))], {"c": np.full(4, 3, np.int64)})
    graph = narrow_constants(start)
    tvm.ir.assert_structural_equal(graph.kernels["k"], before)
    assert graph.steps == start.steps
