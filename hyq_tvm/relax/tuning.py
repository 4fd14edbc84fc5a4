"""MetaSchedule tuning of the integer kernels that nothing else schedules, and its database applied at build time.

A tuning task is a fused PrimFunc of `build_passes(target)` where the default schedule starts (weights packed,
legalized, fused) that is not scheduled or packed already and computes in integers only: float kernels always
keep the default schedule, so their bits stay the same on every target. Each task gets `trials` measured
candidates in all, the records already in the database included, the first of them its default schedule: a
tuned schedule replaces it only where it was measured faster. A rerun continues an interrupted run: it measures
only candidates the database does not hold and skips the kernels whose search ran out of new ones.
The database is MetaSchedule's JSONDatabase in one folder (database_workload.json and
database_tuning_record.json, one JSON line per entry, appended) with tuning.json saying what was tuned and how
the records were measured; a line cut short by a kill is dropped when the database is opened.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..errors import HyqError
from ..fileio import write_json
from . import schedule
from .pack import pack_weights
from .schedule import build_pipeline, schedule_pass

_NORMALIZE = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")   # a PrimFunc as a workload
SCHEDULES = Path("schedules")
FILES = ("database_workload.json", "database_tuning_record.json")
SUMMARY = "tuning.json"
HOST_COST = "host wall time"
RPC_SESSION_SECONDS = 120   # the most one candidate may hold a board
FAILED_SECONDS = 1e10       # MetaSchedule's time of a candidate that failed
DEVICE = "cpu"              # where candidates run: every target here is an LLVM CPU


def database_dir(target: str, model: str, img_size: int, wbits: int, abits: int, root: Path = SCHEDULES) -> Path:
    """The database folder of a target and a model at an input size and bit-widths: root/TARGET/MODEL-SIZE-wWaA."""
    return Path(root) / target / f"{model}-{img_size}-w{wbits}a{abits}"


def rpc_cost(key: str) -> str:
    """What the records measure when tuned on the boards of tracker key `key`."""
    return f"board wall time via RPC tracker {key}"


def build_stages(target: tvm.target.Target) -> tuple[list, list]:
    """The passes of `build_passes(target)` cut where the default schedule starts: (packing, legalization and
    fusion; the default schedule and the rest)."""
    passes = list(build_pipeline(target).passes)
    names = [p.info.name for p in passes]
    name = schedule_pass(target).info.name
    if name not in names:
        raise RuntimeError(f"schedule.build_pipeline no longer runs {name} at its top level")
    cut = names.index(name)
    return [pack_weights(target), *passes[:cut]], passes[cut:]


def fused(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module as the default schedule receives it: weights packed, legalized, fused."""
    with target:
        return tvm.transform.Sequential(build_stages(target)[0])(mod)


def _computes_floats(func: tirx.PrimFunc) -> bool:
    """Whether any value, buffer or variable of `func` is a float."""
    def floating(expr):
        return tvm_ffi.VisitInterrupt(expr) if "float" in str(expr.ty) else None
    return tvm_ffi.structural_walk(func, [(tvm.ir.expr.Expr, floating)]) is not None


def _packed(func: tirx.PrimFunc) -> bool:
    """Whether a block of `func` is marked for a schedule of its own (packed kernels)."""
    marks = {*schedule.ANNOTATED, schedule.KEEP}

    def marked(block):
        return tvm_ffi.VisitInterrupt(block) if marks & set(block.annotations) else None
    return tvm_ffi.structural_walk(func, [(s_tir.SBlock, marked)]) is not None


def is_task(func) -> bool:
    """Whether `func` is a tuning task: a PrimFunc not scheduled nor packed, with no float anywhere."""
    return (isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get("tirx.is_scheduled", False))
            and not _packed(func) and not _computes_floats(func))


def tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list[ms.ExtractedTask]:
    """The tuning tasks of the lowered module `mod` built for `target`, one per distinct kernel."""
    found = ms.relax_integration.extract_tasks(fused(mod, target), target)
    return [t for t in found if is_task(t.dispatched[0]["main"])]


def _complete_lines(data: bytes) -> bytes:
    """`data` up to its last newline: without a line cut short by a kill or still being written."""
    return data[:data.rfind(b"\n") + 1]


def open_database(folder: str | Path) -> ms.database.JSONDatabase:
    """The JSONDatabase in `folder` to tune into (created when missing), a partial last line of each file cut."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path in (folder / name for name in FILES):
        data = path.read_bytes() if path.is_file() else b""
        if len(_complete_lines(data)) < len(data):
            with open(path, "r+b") as f:
                f.truncate(len(_complete_lines(data)))
    return ms.database.JSONDatabase(*(str(folder / name) for name in FILES))


def has_database(folder: str | Path) -> bool:
    """Whether `folder` holds a tuning database."""
    return all((Path(folder) / name).is_file() for name in FILES)


def check_database(folder: str | Path) -> Path:
    """`folder` as a Path if it holds a tuning database, else a HyqError."""
    if not has_database(folder):
        raise HyqError(f"no tuning database in {folder} (python -m hyq_tvm.tune writes one)")
    return Path(folder)


def read_database(folder: str | Path) -> ms.database.JSONDatabase:
    """The complete records of the database in `folder`, read into memory (the folder is left as it is)."""
    folder = check_database(folder)
    with tempfile.TemporaryDirectory() as scratch:
        for name in FILES:
            (Path(scratch) / name).write_bytes(_complete_lines((folder / name).read_bytes()))
        return ms.database.JSONDatabase(*(str(Path(scratch) / name) for name in FILES), allow_missing=False)


def trials_done(db: ms.database.Database, task: ms.ExtractedTask) -> int:
    """How many candidates of `task` the database holds records of, failed ones included."""
    workload = db.commit_workload(task.dispatched[0])
    return sum(r.workload.same_as(workload) for r in db.get_all_tuning_records())


def best_us(db: ms.database.Database, task: ms.ExtractedTask) -> float | None:
    """The mean time in microseconds of the best measured candidate of `task`, or None."""
    best = db.get_top_k(db.commit_workload(task.dispatched[0]), 1)
    if not best:
        return None
    secs = [float(s) for s in best[0].run_secs]
    return round(sum(secs) / len(secs) * 1e6, 3)


@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates in this process (no worker pool, tensor intrinsics imported once) into .so files
    linked by `fcompile` (None: the host's compiler) under `folder`."""

    def __init__(self, folder: str, fcompile: Callable | None = None):
        super().__init__()
        self.folder, self.fcompile = folder, fcompile

    def build(self, build_inputs: list[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        return [self._build(b) for b in build_inputs]

    def _build(self, build_input: ms.builder.BuilderInput) -> ms.builder.BuilderResult:
        try:
            lib = tvm.tirx.build(build_input.mod, build_input.target)
            path = str(Path(tempfile.mkdtemp(dir=self.folder)) / "candidate.so")   # MetaSchedule removes its folder
            lib.export_library(path, fcompile=self.fcompile)
        except Exception as err:   # a candidate that does not build is a failed trial, not a failed run
            return ms.builder.BuilderResult(None, f"{type(err).__name__}: {err}")
        return ms.builder.BuilderResult(path, None)


def runner(tracker: tuple[str, int] | None = None, key: str | None = None) -> ms.runner.Runner:
    """Times candidates on this machine (a worker process: a candidate that crashes fails alone) or, with a
    tracker, on a board of `key` through it."""
    if tracker is None:
        return ms.runner.LocalRunner()
    config = ms.runner.RPCConfig(tracker_host=tracker[0], tracker_port=tracker[1], tracker_key=key,
                                 session_timeout_sec=RPC_SESSION_SECONDS)
    return ms.runner.RPCRunner(rpc_config=config)


@derived_object
class _Unmeasured(ms.search_strategy.PySearchStrategy):
    """An evolutionary search that skips the candidates whose schedule the database holds already (MetaSchedule
    only skips those of the running session): a rerun measures new candidates, not its best ones again."""

    def __init__(self, search: ms.search_strategy.SearchStrategy, measured: set[int]):
        super().__init__()
        self.search, self.measured = search, measured

    def _initialize_with_tune_context(self, context: ms.TuneContext) -> None:
        self.search._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None) -> None:
        self.search.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.search.post_tuning()

    def generate_measure_candidates(self) -> list[ms.search_strategy.MeasureCandidate] | None:
        while (found := self.search.generate_measure_candidates()) is not None:
            fresh = {key: c for c in found if (key := tvm_ffi.structural_hash(c.sch.mod)) not in self.measured}
            if fresh:
                self.measured.update(fresh)
                return list(fresh.values())
        return None

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.search.notify_runner_results(measure_candidates, results)

    def clone(self) -> "_Unmeasured":
        return _Unmeasured(self.search.clone(), set(self.measured))


def _measured(db: ms.database.Database, task: ms.ExtractedTask) -> set[int]:
    """The structural hashes of the schedules of `task` that the database holds records of."""
    workload, keys = db.commit_workload(task.dispatched[0]), set()
    for record in db.get_all_tuning_records():
        if record.workload.same_as(workload):
            sch = s_tir.Schedule(task.dispatched[0])
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            keys.add(tvm_ffi.structural_hash(sch.mod))
    return keys


def _context(task: ms.ExtractedTask, trials: int, db: ms.database.Database) -> ms.TuneContext:
    """The task's tuning context: an evolutionary search of candidates the database does not hold, whose
    population grows with the trials it is to pick (MetaSchedule's 512 from 64 trials on)."""
    population = min(512, 8 * trials)
    search = ms.search_strategy.EvolutionarySearch(population_size=population,
                                                   init_min_unmeasured=min(50, population))
    return ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                          search_strategy=_Unmeasured(search, _measured(db, task)), task_name=task.task_name).clone()


def _measure_default(task: ms.ExtractedTask, db: ms.database.Database, builder: ms.builder.Builder,
                     measure: ms.runner.Runner) -> str | None:
    """Commit the default schedule of `task`, built and timed like a candidate, as a record of it; why it
    failed, or None."""
    func = task.dispatched[0]["main"]
    sch = schedule.default_schedule(func, task.target)
    args = ms.arg_info.ArgInfo.from_prim_func(func)
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, task.target)])
    error, secs = built.error_msg, [FAILED_SECONDS]
    if error is None:
        result = measure.run([ms.runner.RunnerInput(built.artifact_path, DEVICE, args)])[0].result()
        error, secs = result.error_msg, result.run_secs or secs
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(task.dispatched[0]), secs,
                                                     task.target, args))
    return error


def _tune_task(task: ms.ExtractedTask, trials: int, db: ms.database.Database, builder: ms.builder.Builder,
               measure: ms.runner.Runner, log: Callable[[str], None]) -> int:
    """Bring `task` up to `trials` records: its default schedule first, then MetaSchedule's candidates; the
    records it has now."""
    error = None if trials_done(db, task) else _measure_default(task, db, builder, measure)
    if error:
        log(f"{task.task_name}: the default schedule failed: {error.strip().splitlines()[-1]}")
    left = trials - trials_done(db, task)
    if left > 0:
        ms.tune.tune_tasks(tasks=[_context(task, left, db)], task_weights=[1.0], max_trials_global=left,
                           max_trials_per_task=left, num_trials_per_iter=min(64, left), builder=builder,
                           runner=measure, database=db, work_dir=tempfile.gettempdir())   # unused: db is given
    return trials_done(db, task)


def _summary(folder: Path, about: dict, trials: int, cost: str, done: dict[str, int], exhausted: set[str]) -> None:
    write_json(folder / SUMMARY, {**about, "trials": trials, "cost": cost, "records": done,
                                  "exhausted": sorted(exhausted)})


def _previous_summary(folder: Path, cost: str) -> dict:
    """The tuning.json of the database in `folder` ({} if none); HyqError if its records were measured otherwise
    than `cost`."""
    path = folder / SUMMARY
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("cost", cost) != cost:
        raise HyqError(f"the database in {folder} was measured with {old['cost']}, not {cost}: tune into another"
                       " folder")
    return old


def tune(mod: tvm.IRModule, target: tvm.target.Target, folder: str | Path, trials: int, about: dict,
         tracker: tuple[str, int] | None = None, key: str | None = None, fcompile: Callable | None = None,
         log: Callable[[str], None] = print) -> dict[str, int]:
    """Tune every task of `mod` for `target` up to `trials` records each in the database in `folder`, measured
    on this machine or, with a tracker, on a board of `key` (candidates linked by `fcompile`); writes
    tuning.json (`about`, how, and the workloads whose search ran out of new candidates: not searched again)
    after each task. Returns the records per task."""
    if trials < 1:
        raise HyqError(f"--trials must be at least 1, not {trials}")
    folder = Path(folder)
    cost = HOST_COST if tracker is None else rpc_cost(key)
    exhausted = set(_previous_summary(folder, cost).get("exhausted", []))
    found = tasks(mod, target)
    db = open_database(folder)
    done = {t.task_name: trials_done(db, t) for t in found}
    _summary(folder, about, trials, cost, done, exhausted)
    log(f"{len(found)} tasks, {trials} trials each ({sum(done.values())} records already in {folder})")
    with tempfile.TemporaryDirectory() as scratch:
        builder, measure = InProcessBuilder(scratch, fcompile), runner(tracker, key)
        for i, task in enumerate(found, 1):
            workload = str(tvm_ffi.structural_hash(task.dispatched[0]))
            if workload not in exhausted:
                done[task.task_name] = _tune_task(task, trials, db, builder, measure, log)
                exhausted |= {workload} if done[task.task_name] < trials else set()
                _summary(folder, about, trials, cost, done, exhausted)
            log(f"[{i}/{len(found)}] {task.task_name}: {done[task.task_name]}/{trials} trials"
                f"{' (no more new candidates)' if workload in exhausted else ''}, best {best_us(db, task)} us")
    return done


def _tuned(func: tirx.PrimFunc, sch: s_tir.Schedule) -> tirx.PrimFunc:
    """The scheduled PrimFunc with the attributes of `func` (not the ones tuning adds), marked scheduled."""
    tuned, kept = sch.mod["main"], dict(func.attrs.items()) if func.attrs else {}
    for key in set(tuned.attrs.keys() if tuned.attrs else ()) - set(kept):
        tuned = tuned.without_attr(key)
    return tuned.with_attrs({**kept, "tirx.is_scheduled": True})


def apply_database(folder: str | Path, target: tvm.target.Target) -> tvm.transform.Pass:
    """Pass that gives each tuning task of a fused module that the database in `folder` holds its best measured
    schedule (every other PrimFunc unchanged)."""
    db = read_database(folder)

    @tvm.transform.module_pass(opt_level=0, name="HyqApplyTuned")
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        out = mod.clone()
        for gv, func in mod.functions_items():
            sch = db.query_schedule(_NORMALIZE(func), target, gv.name_hint) if is_task(func) else None
            if sch is not None:
                out.update_func(gv, _tuned(func, sch))
        return out
    return apply
