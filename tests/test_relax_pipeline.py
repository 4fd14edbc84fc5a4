"""The compiler pipeline: import with plan names, QDQ annotation, integerization, host build."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

from hyq_tvm import data
from hyq_tvm.artifact import LIBRARY, METADATA, PLAN, atomic_dir
from hyq_tvm.quant.calibrate import calibrate
from hyq_tvm.build import compile_plan
from hyq_tvm.cli.compile import main
from hyq_tvm.errors import HyqError
from hyq_tvm.quant.prepare import quantized_model
from hyq_tvm.fileio import sha256_file
from hyq_tvm.quant.modules import QuantLayer
from hyq_tvm.quant.plan import QuantPlan, plan_layers
from hyq_tvm.quant.quantizer import QuantSpec, minmax_params
from hyq_tvm.relax import integerize
from hyq_tvm.relax.annotate import annotate
from hyq_tvm.relax.census import op_census
from hyq_tvm.relax.pipeline import lower
from hyq_tvm.quant.marks import roles
from hyq_tvm.relax.importer import check_marks, import_model, mark_calls, mark_name, to_relax
from hyq_tvm.targets import known_targets, load_target

HEAVY = ("relax.nn.conv2d(", "relax.matmul(")


@pytest.fixture(scope="module")
def plan() -> QuantPlan:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return calibrate("mobilevit_xxs", method="minmax", images=8, progress=False)[0]


@pytest.fixture(scope="module")
def imported(plan) -> tvm.IRModule:
    return import_model(plan)


def run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target=load_target("host").tvm_target()), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_every_plan_entry_is_marked_exactly_once(plan, imported):
    counts = Counter(mark_name(c) for c in mark_calls(imported))
    expected = Counter((layer, role) for layer, entry in plan.layers.items() for role in roles(entry.op))
    assert counts == expected


def test_a_plan_layer_missing_from_the_graph_is_named(plan, imported):
    extra = copy.deepcopy(plan)
    extra.layers["head.ghost"] = extra.layers["head.fc"]
    with pytest.raises(HyqError, match=r"no call site for 1 plan layer\(s\): head.ghost$"):
        check_marks(imported, extra)


@tvm.instrument.pass_instrument
class _PassNames:
    def __init__(self):
        self.names = []

    def run_before_pass(self, mod, info):
        self.names.append(info.name)


def test_lowering_runs_the_named_passes_and_leaves_no_float_conv2d_or_matmul(plan):
    seen = _PassNames()
    with tvm.transform.PassContext(instruments=[seen]):
        lowered = lower(plan)
    assert [n for n in seen.names if n.startswith("hyq.")] == ["hyq.Lower", "hyq.ImportPlan", "hyq.Annotate",
                                                                "hyq.Integerize"]
    assert lowered.input_layers == ["stem.conv"] and lowered.layers
    census = op_census(lowered.mod)
    heavy = {k: n for k, n in census.items() if k.startswith(HEAVY)}
    assert heavy and all(k.endswith("(int8,int8)->int32") for k in heavy), heavy
    assert sum(heavy.values()) == sum(1 for e in plan.layers.values() if e.op in ("conv2d", "linear", "matmul"))
    assert not any(k.startswith("relax.call_pure_packed") for k in census)


def _overflowing(plan: QuantPlan) -> tuple[QuantPlan, str]:
    """(the plan with the output scale of its first requantized conv2d / linear made finer, so that its largest
    multiplier is 2^16: its bias still fits the rounding term, but its requantization overflows int64; the
    layer's name)."""
    layer = next(lay for lay in lower(plan).layers if lay.out_scale is not None and lay.weight is not None)
    out = tuple(float(s) for s in np.atleast_1d(layer.out_scale))
    factor = 2.0 ** 16 / float(np.max(layer.acc_scale / layer.out_scale))
    crafted = copy.deepcopy(plan)
    for name, entry in crafted.layers.items():
        inputs = tuple(dataclasses.replace(q, scale=tuple(s / factor for s in q.scale)) if q.scale == out else q
                       for q in entry.inputs)
        crafted.layers[name] = dataclasses.replace(entry, inputs=inputs)
    assert crafted.layers != plan.layers
    return crafted, layer.name


def test_a_plan_whose_requantization_could_overflow_int64_is_refused_naming_its_layer(plan):
    crafted, name = _overflowing(plan)
    with pytest.raises(HyqError, match=rf"^layer '{re.escape(name)}' \(relax\.[\w.]+ '\w+' in @main\): the"
                                       r" requantization overflows int64 in \d+ of \d+ channel\(s\)"):
        lower(crafted)


def _on_terminal(cmd: list[str]) -> tuple[int, list[str]]:
    """Run `cmd` with a terminal for its output: (exit status, the non-blank lines the terminal shows, each as
    the text after its last carriage return)."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the command has closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    lines = [line.rstrip("\r").split("\r")[-1].rstrip() for line in out.decode().split("\n")]
    return proc.wait(timeout=600), [line for line in lines if line]


def test_compile_error_stands_alone_on_the_terminal(plan, tmp_path):
    """The error of a stage under the progress bar: the bar is erased, the one-line error is all that shows."""
    crafted, name = _overflowing(plan)
    crafted.save(tmp_path / "plan.json")
    rc, lines = _on_terminal([sys.executable, "-m", "hyq_tvm.compile", "--plan", str(tmp_path / "plan.json"),
                              "-o", str(tmp_path / "out")])
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: layer '{name}' (") and "overflows int64" in lines[0]
    assert not (tmp_path / "out").exists()


class _Tiny(nn.Module):
    """A grouped conv and a linear layer, quantized with low bit-widths, channel-wise and asymmetric."""

    def __init__(self):
        super().__init__()
        self.conv = QuantLayer(nn.Conv2d(8, 6, 3, padding=1, groups=2))
        self.fc = QuantLayer(nn.Linear(6 * 5 * 5, 4))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@torch.no_grad()
def test_qdq_graph_computes_the_fake_quant_arithmetic():
    model, x = _Tiny().eval(), torch.randn(1, 8, 5, 5)
    hidden = torch.relu(model.conv.inner(x)).flatten(1)
    for layer, act_spec, wbits, seen in ((model.conv, QuantSpec(4, False, 1), 6, x),
                                         (model.fc, QuantSpec(6, False, None), 4, hidden)):
        layer.act = minmax_params(act_spec, seen)
        layer.weight = minmax_params(QuantSpec(wbits, True, 0), layer.folded_weight(layer.act))
        layer.enabled = True
    plan = QuantPlan({}, {}, plan_layers(model, []))
    expected = model(x).detach().numpy()
    mod = annotate(to_relax(model, x), plan)
    np.testing.assert_allclose(run(mod, x.numpy()), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(integerize(mod), x.numpy()), expected, rtol=1e-5, atol=1e-5)
    del plan.layers["fc"]
    with pytest.raises(HyqError, match="marks layer 'fc', which the plan does not quantize"):
        annotate(to_relax(model, x), plan)


def test_unknown_target_lists_the_known_ones():
    assert "host" in known_targets()
    with pytest.raises(HyqError, match=r"unknown target 'pdp11'; known targets: .*host"):
        load_target("pdp11")


def test_compile_rejects_a_plan_of_another_model_and_an_unknown_target(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.save(path)
    with pytest.raises(HyqError, match="the plan is for mobilevit_xxs, not efficientformerv2_s0"):
        main(["--plan", str(path), "--model", "efficientformerv2_s0", "-o", str(tmp_path / "out")])
    with pytest.raises(HyqError, match="unknown target 'pdp11'"):
        main(["--plan", str(path), "--target", "pdp11", "-o", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_artifact_folder_is_replaced_only_when_complete(tmp_path):
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("build failed")
    assert [p.name for p in folder.iterdir()] == ["old"]
    with atomic_dir(folder) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


@pytest.mark.slow
def test_host_library_matches_the_fake_quant_model(plan, tmp_path):
    out = compile_plan(plan, "host", tmp_path / "artifact")
    meta = json.loads((out / METADATA).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([LIBRARY, METADATA, PLAN])
    assert meta["sha256"]["library"] == sha256_file(out / LIBRARY)
    assert meta["input"]["shape"] == plan.model["input_shape"] and meta["input"]["quantized_by"] == "stem.conv"
    assert meta["output"]["shape"] == [1, plan.model["num_classes"]]
    assert all(k.endswith("(int8,int8)->int32") for k in meta["op_census"] if k.startswith(HEAVY))

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / LIBRARY)), tvm.cpu())
    model = quantized_model(plan).eval()
    info = plan.model
    images = next(iter(data.test_loader(None, info["img_size"], info["mean"], info["std"], limit=4, batch_size=4)))[0]
    for x in images:
        with torch.no_grad():
            expected = model(x[None]).numpy()
        got = vm["main"](tvm.runtime.tensor(x[None].numpy())).numpy()
        assert got.argmax() == expected.argmax()
        assert np.abs(got - expected).max() < 0.1


def test_batch_norm_that_follows_no_conv_imports_in_eval_mode():
    """A BatchNorm after a residual add stays in the graph (EfficientFormerV2's last norm): running
    statistics and its own eps, as PyTorch's eval mode computes it."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4, eps=1e-3)

        def forward(self, x):
            return self.norm(self.conv(x) + x.mean(1, keepdim=True))

    torch.manual_seed(0)
    net = Net()
    net.norm.running_mean.uniform_(-1, 1)
    net.norm.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(1, 3, 2, 2)  # few positions: batch statistics would differ clearly
    vm = relax.VirtualMachine(tvm.compile(to_relax(net, x), target=load_target("host").tvm_target()), tvm.cpu())
    with torch.no_grad():
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), net(x).numpy(), atol=1e-5)
