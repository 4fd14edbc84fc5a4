"""Instructions of one inference of hyq-tvm's model.so or of onnxruntime on an emulated board: the engine runs
in the board's rootfs (aarch64 TVM runtime or onnxruntime wheel, one thread) under the counting qemu as the
board's CPU, called from Python as an application would.

A Python process loads the model, runs it once, then forks children one after the other, each counted from the
fork on, that run it k times and exit: k = 2, 2 + n, 2, 2 + n. Per inference: the mean of the two differences
(count with k = 2 + n - count with k = 2) / n, of all the child's instructions ("process") and of those in the
files named ("code"): NATIVE, the engine and the system libraries it calls (not the Python interpreter around
the call), or OWN, the engine's own code and libm. Exact when the two differences agree. They may not: a child's
count depends by up to a few hundred instructions on the addresses the heap gives it (onnxruntime's hash tables
are salted by their addresses), and the parent's heap moves a little with each fork; the spread (half the gap
between the two) says by how much. The whole measurement is repeatable: the same files give the same counts.

onnxruntime 1.32's arm64 default fuses a DequantizeLinear with a per-channel zero point into a MatMul as
MatMulIntegerToFloat, which refuses such zero points at run time. Its sessions take onnxruntime's x86-64
default instead (session.qdqisint8allowed=0): per-tensor quantized matmuls still run as MatMulIntegerToFloat,
the others as float kernels between QuantizeLinear and DequantizeLinear, as on the host; the op census of
onnxruntime's optimized graph says which.
"""
from __future__ import annotations

import fcntl
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from .icount import COUNTED_CODE, install_in_rootfs, run_python_counted
from .rootfs import build_rootfs

SYSTEM = "/aarch64-linux-gnu/"  # libc, libm, libstdc++, libgcc_s, the dynamic loader
NATIVE = {"tvm": ("/model.so", "/tvm/lib/", "/tvm_ffi/", SYSTEM),  # model.so, libtvm_runtime, tvm_ffi
          "ort": ("/onnxruntime/", SYSTEM)}                         # onnxruntime/capi/*.so of the wheel
OWN = {"tvm": COUNTED_CODE,  # model.so and libm, as the bench stage counts
       "ort": ("/onnxruntime/", "/libm.so.6")}
ENV = {"ORT_DISABLE_TELEMETRY": "1",  # onnxruntime's telemetry thread makes the counts vary
       "TVM_NUM_THREADS": "1"}
WARMUP_FORKS = 2  # the parent's heap moves most in its first forks
WORK = "/tmp/hyq-engines"  # in the rootfs, one count at a time: the counts depend on the file names seen
# Run in the rootfs: ENGINE MODEL INPUT.npy OPTIMIZED.onnx RUNS...: load the model (onnxruntime: the session
# options of hyq_tvm.onnx_qdq.onnx_session, one thread, the x86-64 QDQ default), run it once, then for each RUNS
# fork a child that runs it RUNS times, one child after the other; print each child's pid.
GUEST = '''\
import gc
import os
import sys
import numpy as np
gc.disable()  # a collection in a child would count too
engine, model, inp, optimized, *runs = sys.argv[1:]
x = np.load(inp)
if engine == "ort":
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.optimized_model_filepath = optimized
    options.add_session_config_entry("session.qdqisint8allowed", "0")
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["MatMulAddFusion"])
    feed = {sess.get_inputs()[0].name: x}
    run = lambda: sess.run(None, feed)
else:
    import tvm
    from tvm import relax
    main = relax.VirtualMachine(tvm.runtime.load_module(model), tvm.cpu())["main"]
    data = tvm.runtime.tensor(x)
    run = lambda: main(data)
run()
for k in map(int, runs):
    pid = os.fork()
    if pid == 0:
        for _ in range(k):
            run()
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]):
        sys.exit(f"the child running the model {k} times failed")
    os.write(1, b"%d\\n" % pid)
'''


def ort_version(root: Path) -> str:
    """The onnxruntime version installed in the rootfs's venv."""
    (dist,) = root.glob("opt/venv/lib/python3*/site-packages/onnxruntime-*.dist-info")
    return dist.name.split("-")[1].removesuffix(".dist-info")


def op_census(path: Path) -> dict[str, int]:
    """Node counts by op type of an ONNX model (onnxruntime's optimized graph: the kernels it runs)."""
    return dict(sorted(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node).items()))


def per_inference(counts: list[int], n: int) -> dict:
    """{"instructions", "exact", "spread"} from the counts of children running the model 2, 2 + n, 2, 2 + n times."""
    base, more, base_again, more_again = counts
    estimates = ((more - base) / n, (more_again - base_again) / n)
    return {"instructions": round(sum(estimates) / 2),
            "exact": estimates[0] == estimates[1] and (more - base) % n == 0,
            "spread": round(abs(estimates[0] - estimates[1]) / 2, 1)}


def _stage(work: Path, engine: str, model: Path, x: np.ndarray) -> str:
    """Write the model, the input and the script into `work`; the model's file name there."""
    if engine == "tvm":
        name = "model.so"  # the name COUNTED_CODE counts
        shutil.copyfile(model, work / name)
    else:
        name = "model.onnx"
        onnx.save_model(onnx.load(str(model)), str(work / name))  # external data (weights) inlined
    np.save(work / "input.npy", np.ascontiguousarray(x))
    (work / "guest.py").write_text(GUEST)
    return name


def engine_instructions(engine: str, model: Path, x: np.ndarray, board: str, code, n: int = 8) -> dict:
    """Per-inference instructions of `engine` ("tvm": a model.so, "ort": an ONNX model) on input `x` on the
    emulated `board`: {"process": per_inference(...), "code": per_inference(...) of the files whose path contains
    one of `code`, "counts", "kernels" (ort: op census of its optimized graph)}."""
    root = build_rootfs()
    install_in_rootfs(root)
    work = root / WORK.lstrip("/")
    runs = (2, 2 + n, 2, 2 + n)
    with open(root / "tmp" / "hyq-engines.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            name = _stage(work, engine, model, x)
            by_pid, out = run_python_counted(
                root, board, [f"{WORK}/guest.py", engine, f"{WORK}/{name}", f"{WORK}/input.npy",
                              f"{WORK}/optimized.onnx", *[0] * WARMUP_FORKS, *runs], code, ENV)
            counts = [by_pid[int(pid)] for pid in out.split()[-len(runs):]]
            kernels = op_census(work / "optimized.onnx") if engine == "ort" else None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"process": per_inference([c[0] for c in counts], n), "code": per_inference([c[1] for c in counts], n),
            "counts": {"runs": list(runs), "process": [c[0] for c in counts], "code": [c[1] for c in counts]},
            "kernels": kernels}
