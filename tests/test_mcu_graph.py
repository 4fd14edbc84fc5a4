"""The microcontroller backend on this machine: static graph, memory plan and generated C, compiled with the host's
gcc and checked bit for bit against TVM's build of the same integer graph."""
import ctypes
import json
import subprocess

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, te

from hyq_tvm.cli.compile import main as compile_main
from hyq_tvm.errors import HyqError
from hyq_tvm.mcu.boards import load_board
from hyq_tvm import data
from hyq_tvm.mcu.build import compile_mcu, emulate, quantize_input
from hyq_tvm.mcu.cgraph import Grid, static_graph, strip_ends
from hyq_tvm.mcu.emit import SHIM_H, buffers, write_c_folder
from hyq_tvm.mcu.int4 import pack_int4, unpack_int4
from hyq_tvm.mcu.firmware import STACK_BYTES, build_emulated, float_instructions, model_size, run_emulated
from hyq_tvm.mcu.kernels import kernel_source
from hyq_tvm.mcu.memory import Buffer, lower_bound, plan_arena
from hyq_tvm.mcu.schedule import mcu_schedule
from hyq_tvm.quant.baselines.minmax import calibrate_minmax
from hyq_tvm.quant.calibrate import calibrate
from hyq_tvm.quant.plan import QuantPlan, plan_layers
from hyq_tvm.relax.annotate import annotate
from hyq_tvm.relax.importer import to_relax
from hyq_tvm.relax.integer import integerize_layers
from hyq_tvm.relax.pipeline import build
from hyq_tvm.relax.sink import sink_dequantize
from hyq_tvm.targets import load_target

from test_tensors import _Block, _integer


def test_buffers_alive_at_once_never_share_bytes_and_the_arena_meets_the_lower_bound():
    rng = np.random.default_rng(0)
    found = []
    for i in range(60):
        first = int(rng.integers(0, 40))
        found.append(Buffer(f"b{i}", int(rng.integers(1, 5000)), first, first + int(rng.integers(0, 6))))
    plan = plan_arena(found)
    for a in found:
        for b in found:
            if a.name < b.name and a.first <= b.last and b.first <= a.last:
                ea, eb = plan.offsets[a.name] + a.nbytes, plan.offsets[b.name] + b.nbytes
                assert ea <= plan.offsets[b.name] or eb <= plan.offsets[a.name], (a, b)
    assert all(plan.offsets[b.name] % 16 == 0 for b in found)
    assert plan.lower_bound_bytes == lower_bound(found) <= plan.arena_bytes
    assert plan.arena_bytes <= 1.1 * plan.lower_bound_bytes + 16 * len(found)


def test_a_chain_reuses_memory_down_to_its_lower_bound():
    chain = [Buffer("a", 1000, 0, 1), Buffer("b", 2000, 1, 2), Buffer("c", 1000, 2, 3), Buffer("d", 500, 3, 4)]
    plan = plan_arena(chain)
    assert plan.lower_bound_bytes == 3000
    assert plan.arena_bytes == 3008   # a (1000, aligned 1008) then b beside it; c and d reuse a's and b's bytes
    assert plan.offsets["c"] + 1000 <= plan.offsets["b"] or plan.offsets["c"] >= plan.offsets["b"] + 2000


def _small_graph(wbits: int) -> tvm.IRModule:
    """The integer graph of a small integer-mode model (conv, SiLU lookup, residual add, matmul, mean, scale)."""
    torch.manual_seed(0)
    model, x = _Block().eval(), torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        _integer(model, x)
        calibrate_minmax(model, x, wbits, 8)
    plan = QuantPlan({}, {"mode": "integer"}, plan_layers(model, []))
    mod = relax.transform.DecomposeOpsForInference()(to_relax(model, x[:1]))
    mod, _ = integerize_layers(sink_dequantize(annotate(mod, plan)))
    return mod


@pytest.fixture(scope="module")
def small_graph():
    return _small_graph(8)


def _host_library(folder) -> ctypes.CDLL:
    sources = sorted(str(p) for p in folder.glob("*.c"))
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-Wall", "-Werror=implicit-function-declaration",
                    "-o", str(folder / "model.so"), *sources], check=True)
    return ctypes.CDLL(str(folder / "model.so"))


def _host_check(graph_mod: tvm.IRModule, folder, images: int = 4) -> None:
    """The C folder of `graph_mod`, built with the host's gcc, bit-exact with TVM's host build on random inputs."""
    lib = _host_library(folder)
    vm = tvm.relax.VirtualMachine(build(strip_ends(graph_mod)[0], load_target("host").tvm_target()), tvm.cpu())
    rng = np.random.default_rng(1)
    outputs = []
    for _ in range(images):
        x = rng.integers(-128, 128, (1, 3, 8, 8), dtype=np.int8)
        out = np.zeros(5, np.int8)
        assert lib.hyq_model_run(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p)) == 0
        np.testing.assert_array_equal(out, vm["main"](tvm.runtime.tensor(x)).numpy().reshape(-1))
        outputs.append(out)
    assert len({o.tobytes() for o in outputs}) == images


def test_the_generated_c_is_bit_exact_with_tvm_and_has_no_float(small_graph, tmp_path):
    graph = static_graph(small_graph)
    kernels = kernel_source(graph.kernels)
    assert "float" not in kernels.source and "double" not in kernels.source
    memory = write_c_folder(tmp_path, graph, kernels, "block")
    assert memory.arena_bytes >= memory.arena_lower_bound_bytes > 0
    assert memory.arena_bytes <= 1.1 * memory.arena_lower_bound_bytes + 64
    assert memory.weights_bytes == sum(v.nbytes for v in graph.values.values() if v.data is not None)
    header = (tmp_path / "hyq_model.h").read_text()
    assert f"#define HYQ_INPUT_BYTES {3 * 8 * 8}" in header and "#define HYQ_OUTPUT_BYTES 5" in header
    assert not any(step.kernel.startswith("hyq_unpack_int4") for step in graph.steps)   # 8-bit weights
    _host_check(small_graph, tmp_path)


def test_4_bit_weights_are_packed_two_per_byte_and_unpacked_bit_exact(tmp_path):
    w4 = _small_graph(4)
    graph = static_graph(w4)
    unpacks = [step for step in graph.steps if step.kernel.startswith("hyq_unpack_int4")]
    assert len(unpacks) == 3   # conv1, conv2, fc: one per GEMM weight
    packed = sum(graph.values[step.args[0]].nbytes for step in unpacks)
    unpacked = sum(graph.values[step.args[1]].nbytes for step in unpacks)
    assert (packed, unpacked) == (54 + 8 + 12, 108 + 16 + 24)   # fc's 5 x 4 weight as 6 rows (an even count)
    write_c_folder(tmp_path, graph, kernel_source(graph.kernels), "block-w4")
    _host_check(w4, tmp_path)


@pytest.mark.parametrize("shape", [(3,), (4, 3, 3), (5, 7)])
def test_int4_packing_round_trips_and_halves_the_bytes(shape):
    w = np.random.default_rng(3).integers(-8, 8, shape).astype(np.int8)
    packed = pack_int4(w)
    assert packed.dtype == np.int8 and packed.size == (w.size + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, shape), w)
    np.testing.assert_array_equal(unpack_int4(pack_int4(np.array([-8, 7, -1, 0], np.int8)), (4,)), [-8, 7, -1, 0])


def test_every_intermediate_and_workspace_is_planned_and_kernels_get_their_tensors(small_graph):
    graph = static_graph(small_graph)
    planned = {b.name for b in buffers(graph, {})}
    computed = {a for step in graph.steps for a in step.args[len(step.args) - step.outputs:]}
    assert planned == computed - {graph.output}
    assert graph.steps[0].args[0] == graph.input and graph.output in graph.steps[-1].args
    assert {s.kernel for s in graph.steps} == {gv.name_hint for gv, _ in graph.kernels.functions_items()}


def test_the_input_is_quantized_as_the_graph_quantizes_it():
    grid = Grid((0.5,), (3,), 1)
    x = np.array([[[[0.25, 0.75, -1.25, 100.0, -100.0]]]], np.float32)
    np.testing.assert_array_equal(quantize_input(x, grid).ravel(), [3, 5, 1, 127, -128])   # 0.5 -> 0, 1.5 -> 2
    grid = Grid((1.0, 0.25), (0, -1), 1)
    x = np.ones((1, 2, 1, 1), np.float32)
    np.testing.assert_array_equal(quantize_input(x, grid).ravel(), [1, 3])


def test_a_graph_with_float_ends_missing_is_refused(small_graph):
    stripped, grid_in, grid_out = strip_ends(small_graph)
    assert len(grid_in.scale) == 1 and len(grid_out.scale) == 1
    with pytest.raises(HyqError, match="--mode integer"):
        strip_ends(stripped)


def test_a_partial_mode_plan_is_refused_for_a_microcontroller(tmp_path):
    plan = QuantPlan({"name": "mobilevit_xxs"}, {"mode": "partial", "wbits": 8, "abits": 8}, {})
    with pytest.raises(HyqError, match=r"^the plan is in partial mode, .* --mode integer$"):
        compile_mcu(plan, "stm32h743", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(HyqError, match="unknown MCU board 'stm32f0'"):
        compile_mcu(plan, "stm32f0", tmp_path / "out")


@pytest.mark.parametrize("board", ["mps2-an386", "mps2-an500", "mps2-an505", "mps3-an547"])   # M4, M7, M33, M55
def test_the_small_model_runs_bit_exact_on_each_emulated_core_without_float(small_graph, tmp_path, board):
    graph = static_graph(small_graph)
    write_c_folder(tmp_path / "c", graph, kernel_source(graph.kernels), "block")
    spec = load_board(board)
    elf = build_emulated(tmp_path / "c", spec, tmp_path / "model.elf")
    assert float_instructions(elf) == []
    size = model_size(tmp_path / "c", spec)
    assert size["text"] > 0 and 0 < size["stack"] < STACK_BYTES
    x = np.random.default_rng(2).integers(-128, 128, (3, 1, 3, 8, 8), dtype=np.int8)
    run = run_emulated(elf, spec, x.reshape(3, -1))
    vm = tvm.relax.VirtualMachine(build(strip_ends(small_graph)[0], load_target("host").tvm_target()), tvm.cpu())
    expected = np.stack([vm["main"](tvm.runtime.tensor(image)).numpy().reshape(-1) for image in x])
    np.testing.assert_array_equal(run.outputs, expected)
    assert run.instructions_per_inference > 0


@pytest.mark.slow
def test_mobilevit_xxs_compiles_for_stm32h743_and_runs_bit_exact_on_the_emulated_m7(tmp_path, capsys):
    torch.set_num_threads(1)
    plan = calibrate("mobilevit_xxs", method="minmax", images=8, mode="integer", progress=False)[0]
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "xxs-h743"
    compile_main(["--plan", str(tmp_path / "plan.json"), "--target", "stm32h743", "-o", str(out), "--emulate", "3"])
    printed = capsys.readouterr().out
    assert "EMULATED mps2-an500 (stm32h743): 3/3 outputs bit-exact with the host integer graph" in printed
    meta = json.loads((out / "metadata.json").read_text())
    memory, board = meta["memory"], load_board("stm32h743")
    assert memory["arena_lower_bound_bytes"] <= memory["arena_bytes"] <= 1.1 * memory["arena_lower_bound_bytes"]
    assert memory["flash_bytes"] <= board.memory.flash.size and memory["ram_bytes"] <= board.memory.ram.size
    assert {"hyq_model.h", "hyq_model.c", "hyq_kernels.c", "hyq_weights.c", "Makefile", "stm32h743.ld",
            "hyq_startup.c", "README.md", "plan.json"} <= {p.name for p in out.iterdir()}
    assert float_instructions(build_emulated(out, board, tmp_path / "model.elf")) == []
    with pytest.raises(HyqError, match=r"^the model does not fit stm32f746-disco: it needs .* of flash"):
        compile_mcu(plan, "stm32f746-disco", tmp_path / "f746")
    assert not (tmp_path / "f746").exists()


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64)]


class _Any(ctypes.Structure):
    _fields_ = [("type_index", ctypes.c_int32), ("zero_padding", ctypes.c_uint32), ("v_ptr", ctypes.c_void_p)]


def test_sums_and_maxima_scheduled_for_a_microcontroller_compute_the_same_in_c(tmp_path):
    """A row max (its update a select: not unrolled, TVM's C generator would reuse a stale operand) and a row sum
    (unrolled) through mcu_schedule and kernel_source, compiled by gcc, against numpy."""
    x = te.placeholder((4, 16), "int8", name="x")
    k, j = te.reduce_axis((0, 16), "k"), te.reduce_axis((0, 16), "j")
    top = te.compute((4,), lambda i: te.max(x[i, k].astype("int32"), axis=k), name="top")
    total = te.compute((4,), lambda i: te.sum(x[i, j].astype("int32") - top[i], axis=j), name="total")
    func = te.create_prim_func([x, top, total])
    source = kernel_source(tvm.IRModule({"rows": mcu_schedule(func, None).mod["main"]})).source
    (tmp_path / "hyq_shim.h").write_text(SHIM_H)
    (tmp_path / "rows.c").write_text(source)
    lib = _host_library(tmp_path)
    data = np.random.default_rng(4).integers(-128, 128, (4, 16), dtype=np.int8)
    outs = [np.zeros(4, np.int32), np.zeros(4, np.int32)]
    tensors = [_DLTensor(a.ctypes.data, 1, 0, a.ndim, 0, a.dtype.itemsize * 8, 1, None, None, 0) for a in (data, *outs)]
    args = (_Any * 3)(*[_Any(7, 0, ctypes.cast(ctypes.pointer(t), ctypes.c_void_p)) for t in tensors])
    assert lib.__tvm_ffi_rows(None, args, 3, None) == 0
    np.testing.assert_array_equal(outs[0], data.astype(np.int32).max(1))
    np.testing.assert_array_equal(outs[1], (data.astype(np.int32) - outs[0][:, None]).sum(1))


@pytest.mark.slow
def test_efficientformerv2_s0_fits_stm32h743_at_w4a4_and_runs_bit_exact_on_the_emulated_m7(tmp_path):
    """W8A8 is refused for stm32h743 with the numbers (its 8-bit weights alone exceed the 2 MB of flash); W4A4
    fits and runs bit-exact on the board's QEMU machine."""
    torch.set_num_threads(1)
    plans = {bits: calibrate("efficientformerv2_s0", method="minmax", images=8, wbits=bits, abits=bits,
                             mode="integer", progress=False)[0] for bits in (8, 4)}
    with pytest.raises(HyqError, match=r"^the model does not fit stm32h743: it needs 3,\d{3}.\d KiB of flash"):
        compile_mcu(plans[8], "stm32h743", tmp_path / "w8")
    model = compile_mcu(plans[4], "stm32h743", tmp_path / "w4")
    assert model.memory.flash_bytes <= load_board("stm32h743").memory.flash.size
    info = plans[4].model
    images, labels = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"], limit=2,
                                                batch_size=2)))
    result = emulate(model, images, labels)
    assert result["bitexact"] == 2 and result["macs"] > 20_000_000
    assert 1 < result["instructions"] / result["macs"] < 20
