"""MetaSchedule tuning (hyq_tvm.relax.tuning): which kernels are tasks, a resumable database, tuned builds exact."""
import json

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from hyq_tvm.build import compile_plan
from hyq_tvm.cli import tune as tune_cli
from hyq_tvm.errors import HyqError
from hyq_tvm.relax import pack, tuning
from hyq_tvm.relax.integer.gemm import qconv2d, requantize_primfunc
from hyq_tvm.relax.integer.operand import along, consts
from hyq_tvm.relax.integer.requantize import requant_params
from hyq_tvm.relax.pipeline import build
from hyq_tvm.relax.schedule import schedule_pass
from hyq_tvm.targets import load_target

RNG = np.random.default_rng(0)
HOST = load_target("host").tvm_target()
C, HW = 8, 8
TASK = "fused_conv2d_requantize"


def _module(w: np.ndarray, params: list[np.ndarray]) -> tvm.IRModule:
    """x (int8) -> (its 3x3 depthwise convolution by w requantized to int8: integers only, x * 0.5 in float)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, C, HW, HW), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, groups=C, out_dtype="int32"))
            kernel = requantize_primfunc((1, C, HW, HW), 1, C, False).without_attr("global_symbol")
            y = bb.emit(relax.call_tir(bb.add_func(kernel, "requantize"), [acc, *consts(params)],
                                       relax.TensorType((1, C, HW, HW), "int8")))
            half = bb.emit(relax.op.multiply(relax.op.astype(x, "float32"), relax.const(0.5, "float32")))
            out = bb.emit_output(relax.Tuple([y, half]))
        bb.emit_func_output(out)
    return bb.get()


def _reference(x: np.ndarray, w: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
    """requantize_primfunc's formula on the exact convolution."""
    acc = qconv2d(x, 0, w, padding=(1, 1, 1, 1), groups=C).astype(np.int64)
    q, ls, rs, c, zp = (along(v, 1, 4).astype(np.int64) for v in params)
    return np.clip((((acc << ls) * q + c) >> rs) + zp, -128, 127).astype(np.int8)


@pytest.fixture(scope="module")
def case():
    w = RNG.integers(-128, 128, (C, 1, 3, 3), dtype=np.int8)
    params = requant_params(RNG.uniform(0.01, 0.03, C), np.full(C, 0.5), RNG.integers(-3, 3, C), None,
                            np.int64(2 ** 20), "conv2d")
    return _module(w, params), w, params


@pytest.fixture(scope="module")
def tuned(case, tmp_path_factory):
    """A database tuned with 2 trials (the default schedule and one candidate), cut by a simulated kill mid-line,
    then resumed up to 4: (folder, the record lines of the first run, the log of the second)."""
    folder = tmp_path_factory.mktemp("schedules") / "tiny"
    about = {"target": "host", "model": "tiny"}
    assert tuning.tune(case[0], HOST, folder, 2, about, log=lambda _: None) == {TASK: 2}
    records = folder / tuning.FILES[1]
    first = records.read_text().splitlines(keepends=True)
    with open(records, "a") as f:
        f.write(first[0][: len(first[0]) // 2])
    lines: list[str] = []
    assert tuning.tune(case[0], HOST, folder, 4, about, log=lines.append) == {TASK: 4}
    return folder, first, lines


def test_only_integer_kernels_that_nothing_else_schedules_are_tasks(case):
    mod = case[0]
    assert [t.task_name for t in tuning.tasks(mod, HOST)] == [TASK]
    kernels = {gv.name_hint: f for gv, f in tuning.fused(mod, HOST).functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)}
    assert {name for name, f in kernels.items() if not tuning.is_task(f)} == {"fused_cast_multiply"}  # float
    assert not tuning.is_task(kernels[TASK].with_attr("tirx.is_scheduled", True))


@pytest.mark.skipif(pack.dot_for(HOST) is None, reason="host has no AVX-512 VNNI / NEON")
def test_packed_gemms_are_not_tasks():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((16, 32), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(RNG.integers(-128, 128, (32, 48), dtype=np.int8))
            out = bb.emit_output(bb.emit(relax.op.matmul(x, w, out_dtype="int32")))
        bb.emit_func_output(out)
    fused = tuning.fused(bb.get(), HOST)
    gemms = [f for gv, f in fused.functions_items() if "hyq_gemm" in gv.name_hint]
    assert gemms and not any(tuning.is_task(f) for f in gemms)
    assert not [t for t in tuning.tasks(bb.get(), HOST) if "hyq_gemm" in t.task_name]


def test_a_line_cut_short_is_dropped_when_tuning_and_ignored_when_reading(tmp_path):
    tuning.open_database(tmp_path)
    records = tmp_path / tuning.FILES[1]
    records.write_text('[0, [[["GetSBlock"')
    assert len(tuning.read_database(tmp_path).get_all_tuning_records()) == 0
    assert records.read_text() == '[0, [[["GetSBlock"'   # reading leaves the folder alone
    tuning.open_database(tmp_path)
    assert records.read_text() == ""


def test_missing_databases_are_one_line_errors(tmp_path):
    with pytest.raises(HyqError, match="no tuning database"):
        compile_plan(None, "host", tmp_path / "artifact", schedules=tmp_path / "none")
    with pytest.raises(HyqError, match="no tuning database"):
        build(tvm.IRModule(), HOST, tmp_path)
    with pytest.raises(HyqError, match="--tracker"):
        tune_cli.main(["--target", "rasp4b", "--plan", str(tmp_path / "plan.json")])
    with pytest.raises(HyqError, match="at least 1"):
        tuning.tune(tvm.IRModule(), HOST, tmp_path, 0, {})


@pytest.mark.slow
def test_an_interrupted_run_continues_and_keeps_its_records(tuned):
    folder, first, lines = tuned
    after = (folder / tuning.FILES[1]).read_text().splitlines(keepends=True)
    assert len(after) == 4 and after[:2] == first     # 2 more trials, the first 2 kept, the cut line gone
    assert json.loads(first[0])[1][1][0] < 1          # the default schedule, timed (seconds, not a failure)
    assert len({json.dumps(json.loads(line)[1][0]) for line in after}) == 4   # no schedule measured twice
    assert lines[0].startswith("1 tasks, 4 trials each (2 records already in")
    assert lines[1].startswith(f"[1/1] {TASK}: 4/4 trials, best ")
    summary = json.loads((folder / tuning.SUMMARY).read_text())
    assert summary == {"target": "host", "model": "tiny", "trials": 4, "cost": "host wall time", "records": {TASK: 4},
                       "exhausted": []}
    with pytest.raises(HyqError, match="measured with host wall time"):
        tuning.tune(tvm.IRModule(), HOST, folder, 4, {}, tracker=("127.0.0.1", 9), key="rasp4b")


@pytest.mark.slow
def test_a_kernel_with_no_new_candidates_is_not_searched_again(tmp_path):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.right_shift(relax.op.add(x, relax.const(3, "int32")),
                                                              relax.const(2, "int32"))))
        bb.emit_func_output(out)
    (done,) = tuning.tune(bb.get(), HOST, tmp_path, 64, {}, log=lambda _: None).values()
    assert done < 64 and len(json.loads((tmp_path / tuning.SUMMARY).read_text())["exhausted"]) == 1
    lines: list[str] = []
    assert tuning.tune(bb.get(), HOST, tmp_path, 64, {}, log=lines.append) == {"fused_add_right_shift": done}
    assert f"{done}/64 trials (no more new candidates)" in lines[1]


@pytest.mark.slow
def test_the_build_applies_the_best_record_and_stays_exact(case, tuned):
    mod, w, params = case
    fused = tuning.fused(mod, HOST)
    best = tuning.read_database(tuned[0]).query_schedule(tuning._NORMALIZE(fused[TASK]), HOST, TASK)
    applied = tuning.apply_database(tuned[0], HOST)(fused)
    assert best is not None and applied[TASK].attrs["tirx.is_scheduled"]
    assert tvm_ffi.structural_equal(applied[TASK].body, best.mod["main"].body)
    assert tvm_ffi.structural_equal(applied["fused_cast_multiply"], fused["fused_cast_multiply"])
    assert tvm_ffi.structural_equal(schedule_pass(HOST)(applied.clone())[TASK], applied[TASK])   # not rescheduled

    x = RNG.integers(-128, 128, (1, C, HW, HW), dtype=np.int8)
    for schedules in (None, tuned[0]):
        vm = relax.VirtualMachine(build(mod, HOST, schedules), tvm.cpu())
        y, half = vm["main"](tvm.runtime.tensor(x))
        np.testing.assert_array_equal(y.numpy(), _reference(x, w, params))
        np.testing.assert_array_equal(half.numpy(), x.astype(np.float32) * np.float32(0.5))
