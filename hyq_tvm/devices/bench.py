"""The bench stage: an artifact measured on a device behind a TVM RPC tracker.

Requests a session for a key from the tracker, refuses an artifact whose model.so is built for another
architecture than the key's (before any upload), uploads model.so, measures latency with time_evaluator,
then runs test images (a seeded class-balanced subset) on the device and compares every output bit for bit with
the host twin of the same integer graph. Writes reports/device_<key>.json and .md (one row per model). Boards started by
hyq_tvm.devices are labelled emulated; on a board started with icount the row also gets the exact number
of instructions one inference executes in model.so and libm (QEMU plugin).

A lost RPC session (the server died, the link broke: told by the exception's type, see lost_session) is
reconnected through the tracker in every phase: the latency measurement and an instruction count start again
in a new session; the accuracy loop keeps finished images in a work file (reports/.work/...), so a reconnect,
or a rerun, continues with the next unfinished image and counts none twice.

An MCU artifact (metadata format hyq-tvm/mcu) is benchmarked by hyq_tvm.mcu.remote on the same sessions, work file
and reports: firmware on an MCU board's server, instructions instead of latency.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from . import fleet
from .boards import BOARDS
from .fleet import parse_addr, tracker_summary
from .icount import server_counts
from ..errors import HyqError, check_positive
from ..fileio import atomic_path, sha256_file, write_json
from ..artifact import LIBRARY, load_artifact
from ..mcu.boards import is_mcu_target
from ..targets import target_for_key


DEFAULT_LIMIT = 200
DEFAULT_TIMEOUT = 60.0
MAX_RECONNECTS = 3
T = TypeVar("T")


# --- tracker and sessions ---------------------------------------------------------------------------
def check_tracker(host: str, port: int, timeout: float = 5.0) -> dict:
    """The tracker's summary; HyqError (one line) when nothing answers at host:port."""
    return tracker_summary(host, port, timeout)


def request_session(host: str, port: int, key: str, timeout: float, session_timeout: float = 0):
    """(session, (server host, server port)) for `key`; HyqError when no device is free within `timeout` s."""
    from tvm import rpc
    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=min(timeout, 10) or 10)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except OSError as err:
        raise HyqError(f"RPC tracker {host}:{port} unreachable ({err.strerror or err})") from None
    try:
        if magic != base.RPC_TRACKER_MAGIC:
            raise HyqError(f"{host}:{port} is not a TVM RPC tracker")
        sock.settimeout(timeout)
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
        try:
            value = base.recvjson(sock)
        except (socket.timeout, TimeoutError):
            queue = check_tracker(host, port).get("queue_info", {}).get(key)
            raise HyqError(f"no free device with key {key!r} on tracker {host}:{port} within {timeout:g} s "
                           f"(tracker queue for the key: {queue or 'none registered'})") from None
        except OSError as err:
            raise HyqError(f"RPC tracker {host}:{port} closed the connection ({err})") from None
    finally:
        sock.close()
    if value[0] != base.TrackerCode.SUCCESS:
        raise HyqError(f"RPC tracker {host}:{port} refused the request for {key!r}: {value}")
    url, sport, matchkey = value[1]
    try:
        return rpc.connect(url, sport, matchkey, session_timeout), (url, int(sport))
    except Exception as err:  # noqa: BLE001 - TVM raises several types here
        if lost_session(err):
            raise  # the server went away after the tracker chose it: the caller reconnects
        raise HyqError(f"RPC server {url}:{sport} for {key!r} refused the session ({err})") from None


def lost_session(err: BaseException) -> bool:
    """Whether `err` means the RPC session is gone (server died, link broke, session expired), by its type: TVM's
    RPC client raises InternalError when its socket fails or the server shuts down, RPCSessionTimeoutError (a
    TimeoutError) when the session expired; sockets raise ConnectionError or TimeoutError. An error raised on
    the device arrives as RPCError and is not one."""
    from tvm.error import InternalError

    return isinstance(err, (ConnectionError, TimeoutError, InternalError))


# --- what the tracker's servers are --------------------------------------------------------------------
@dataclass
class DeviceInfo:
    key: str
    arch: str | None              # None: unknown (not checked)
    emulated: bool | None = None  # None: unknown until a session names the server
    board: str | None = None
    qemu_cpu: str | None = None
    icount: bool = False
    entries: list[dict] = field(default_factory=list)  # fleet state entries under the key


def device_info(key: str, tracker: tuple[str, int], state_file: Path | None) -> DeviceInfo:
    """The key's architecture and fleet entries: from the emulated-board state, else from targets/."""
    state = fleet.load_state(state_file or fleet.state_path())
    t = state.get("tracker") or {}
    same_tracker = (t.get("host"), t.get("port")) == tracker
    entries = [b for b in state.get("boards", []) if same_tracker and b.get("key") == key and fleet.alive(b.get("pgid"))]
    arch = None
    if entries and entries[0].get("board") in BOARDS:
        arch = BOARDS[entries[0]["board"]].arch
    elif (spec := target_for_key(key)) is not None:
        arch = spec.arch
    return DeviceInfo(key, arch, entries=entries)


def identify_server(info: DeviceInfo, addr: tuple[str, int]) -> None:
    """Label the session's server: an emulated board of our fleet state, or a real device."""
    for b in info.entries:
        if int(b["port"]) == addr[1] and b["host"] in (addr[0], "0.0.0.0"):
            info.emulated, info.board, info.qemu_cpu, info.icount = True, b["name"], b.get("qemu_cpu"), bool(b.get("icount"))
            return
    info.emulated, info.board = False, f"{addr[0]}:{addr[1]}"


# --- the resumable accuracy loop ----------------------------------------------------------------------
class WorkFile:
    """Finished images, one JSON line each ({"i", "label", "pred", "host_pred", "bitexact", "maxdiff"}; on an MCU
    board also "instructions"), after a header line naming what ran (a different header starts the file again)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.done: dict[int, dict] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines and json.loads(lines[0]) == header:
                for line in lines[1:]:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash: that image is run again
                    self.done.setdefault(int(row["i"]), row)
            else:
                path.unlink()
        if not path.is_file():
            path.write_text(json.dumps(header) + "\n")

    def add(self, row: dict) -> None:
        if row["i"] in self.done:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[row["i"]] = row


class Remote:
    """A session with the artifact loaded, reconnecting (re-request, re-upload) when the server dies. `vm` runs the
    model in the session: made by load (model.so in a Relax VM here)."""

    loaded = "uploaded and loaded model.so"  # what load does, for the log

    def __init__(self, tracker: tuple[str, int], key: str, art, timeout: float,
                 info: DeviceInfo, log: Callable[[str], None], state_file: Path | None = None):
        self.tracker, self.key, self.art, self.timeout, self.info, self.log = tracker, key, art, timeout, info, log
        self.state_file = state_file
        self.sess = self.vm = None
        self.connects = self.lost = 0

    def call(self, what: str, fn: Callable[[], T], session: bool = True) -> T:
        """fn(), in a session with the artifact loaded unless session=False; when the RPC session is lost, fn is
        called again in a new one (MAX_RECONNECTS times in all, then HyqError)."""
        while True:
            try:
                if session and self.vm is None:
                    self.connect()
                return fn()
            except Exception as err:  # noqa: BLE001 - told apart by type: lost_session
                if not lost_session(err):
                    raise
                self.close()
                self.lost += 1
                last = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
                if self.lost > MAX_RECONNECTS:
                    raise HyqError(f"the RPC session for {self.key!r} was lost {self.lost} times; "
                                   f"last: {last}") from None
                self.log(f"{what}: RPC session lost ({last}); reconnecting")

    def connect(self):
        self.close()
        sess, addr = request_session(*self.tracker, self.key, self.timeout)
        if self.connects:  # a board may have been restarted since: read the fleet state again
            self.info.entries = device_info(self.key, self.tracker, self.state_file).entries
        identify_server(self.info, addr)
        t0 = time.perf_counter()
        self.vm = self.load(sess)
        self.sess = sess
        self.connects += 1
        self.log(f"session {self.connects} on {self.info.board}: {self.loaded} in {time.perf_counter() - t0:.1f} s")
        return self

    def load(self, sess):
        """The Relax VM of model.so, uploaded into the session."""
        from tvm import relax

        remote_name = f"hyq-{self.art.meta.get('sha256', {}).get('library', 'model')[:12]}.so"
        sess.upload(str(self.art.library), remote_name)
        return relax.VirtualMachine(sess.load_module(remote_name), sess.cpu())

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        return self.vm["main"](tvm.runtime.tensor(x, self.sess.cpu())).numpy()

    def close(self):
        self.vm = self.sess = None


def image_row(i: int, label: int, got: np.ndarray, want: np.ndarray,
              logits: Callable[[np.ndarray], np.ndarray] = np.asarray) -> dict:
    """The work-file row of image i: the device's output `got` against the host twin's `want`, bit for bit, and
    the classes they predict (the argmax of logits(output))."""
    bitexact = got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
    return {"i": i, "label": int(label), "pred": int(logits(got).argmax()), "host_pred": int(logits(want).argmax()),
            "bitexact": bool(bitexact), "maxdiff": float(np.abs(got.astype("float64") - want.astype("float64")).max())}


def run_images(indices: list[int], work: WorkFile, run: Callable[[list[int]], list[dict]],
               log: Callable[[str], None], chunk: int = 1) -> None:
    """Run every unfinished index, `chunk` at a time, through run (which gives their work-file rows; it reconnects
    when the session is lost), keeping each chunk's rows in the work file."""
    todo = [i for i in indices if i not in work.done]
    if len(todo) < len(indices):
        log(f"resuming: {len(indices) - len(todo)} of {len(indices)} images already done ({work.path})")
    for start in range(0, len(todo), chunk):
        before = len(work.done)
        try:
            rows = run(todo[start:start + chunk])
        except HyqError as err:
            raise HyqError(f"{err} (finished images are kept in {work.path}; rerun to resume)") from None
        for row in rows:
            work.add(row)
        if len(work.done) // 25 > before // 25:
            log(f"{len(work.done)}/{len(indices)} images")


# --- latency and instructions ----------------------------------------------------------------------------
def measure_latency(remote: Remote, x: np.ndarray, repeat: int, number: int = 1) -> dict:
    """Median and p90 ms of `repeat` time_evaluator runs in the remote's session."""
    import tvm

    remote.log(f"measuring latency on {remote.info.board}: {number * repeat} runs")
    dev = remote.sess.cpu()
    timer = remote.vm.time_evaluator("main", dev, number=number, repeat=repeat, min_repeat_ms=0)
    results = np.array(timer(tvm.runtime.tensor(x, dev)).results) * 1e3
    return {"latency_ms_median": round(float(np.median(results)), 3),
            "latency_ms_p90": round(float(np.percentile(results, 90)), 3), "runs": int(number * repeat)}


def session_instructions(remote: Remote, x: np.ndarray, number: int) -> int:
    """Instructions in model.so and libm of one session process on an --icount board (devices.icount
    COUNTED_CODE): load model.so, run main 1 + `number` times in one time_evaluator call, end the session
    and read the count its process wrote when it exited."""
    from tvm import relax, runtime

    sess, addr = request_session(*remote.tracker, remote.key, remote.timeout)
    info = device_info(remote.key, remote.tracker, remote.state_file)
    identify_server(info, addr)
    board = next((b for b in info.entries if b["name"] == info.board and b.get("icount")), None)
    if board is None:
        raise HyqError(f"the session ran on {info.board}, not on a board started with --icount")
    remote.log(f"counting instructions on {board['name']}: main runs {1 + number} times")
    before = set(server_counts(board))  # one session at a time: earlier ones have written their counts
    # copied into the session's folder through the rootfs, not uploaded: the upload's socket reads vary
    name = LIBRARY  # the file name devices.icount.COUNTED_CODE counts the code of
    workpath = sess.get_function("tvm.rpc.server.workpath")(name)
    shutil.copyfile(remote.art.library, Path(board["rootfs"]) / workpath.lstrip("/"))
    dev = sess.cpu()
    vm = relax.VirtualMachine(sess.load_module(name), dev)
    vm.time_evaluator("main", dev, number=number, repeat=1, min_repeat_ms=0)(runtime.tensor(x, dev))
    del vm, dev, sess  # ends the session: its process exits and writes its count
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = fleet.alive(board["pgid"])
        new = [c for p, c in server_counts(board, "icount_code").items() if p not in before]
        if new:
            return new[0]
        if not running:
            raise ConnectionError(f"{board['name']} stopped before its session wrote a count")
        time.sleep(0.2)
    raise HyqError(f"no instruction count from {board['name']} within 120 s after its session ended")


def count_instructions(remote: Remote, x: np.ndarray, n: int, log) -> tuple[int | None, str]:
    """Per-inference instructions in model.so and libm on an --icount board: the counts of two sessions that
    differ only in n more runs of main inside the device's time_evaluator loop, checked to be exact by a third
    session equal to the first. A lost session starts the counts again."""
    info = remote.info
    if not info.emulated:
        return None, "not an emulated board: no instruction counts"
    if not info.icount:
        return None, "board not started with --icount (python -m hyq_tvm.device start BOARD --icount)"
    remote.close()

    def counts() -> list[int]:
        # not counted: a fresh server's first sessions run up to 30k more instructions (lazy set-up in its worker)
        request_session(*remote.tracker, remote.key, remote.timeout)
        return [session_instructions(remote, x, runs) for runs in (1, 1 + n, 1)]

    try:
        c1, cn, again = remote.call("instruction count", counts, session=False)
    except HyqError as err:
        return None, f"instruction count failed: {err}"
    log(f"instructions in model.so and libm: {c1} and {again} (sessions running main twice), {cn} ({n} more times)")
    how = (f"instructions executed in model.so and libm (qemu TCG plugin): (session running main {n + 2} times"
           f" - session running it twice) / {n}")
    if c1 != again or (cn - c1) % n:
        return round((cn - c1) / n), f"{how}; NOT repeatable: two equal sessions counted {c1} and {again}"
    return (cn - c1) // n, f"{how}; exact: two equal sessions counted the same"


# --- reports -------------------------------------------------------------------------------------------
def accuracy(done: list[dict]) -> dict:
    """The report fields of the finished images' work-file rows: bit-exact with the host twin, top-1 accuracy."""
    exact = sum(r["bitexact"] for r in done)

    def top1(pred: str) -> float:
        return round(100.0 * sum(r[pred] == r["label"] for r in done) / max(len(done), 1), 2)

    return {"bitexact": bool(done) and exact == len(done), "top1": top1("pred"), "top1_host": top1("host_pred"),
            "images": len(done), "bitexact_images": exact, "max_abs_diff": max((r["maxdiff"] for r in done), default=0.0),
            "not_bitexact": [{k: r[k] for k in ("i", "maxdiff", "pred", "host_pred")} for r in done if not r["bitexact"]]}


def calibration(meta: dict) -> dict:
    """The plan's calibration of an artifact's metadata, as a report row names it."""
    return {k: meta.get("calibration", {}).get(k) for k in ("method", "wbits", "abits", "mode")}


def finish(reports: Path, key: str, row: dict, work: WorkFile) -> dict:
    """Write the row into the key's reports and drop the work file; the row with the reports' paths."""
    json_path, md_path = write_reports(reports, key, row)
    work.path.unlink(missing_ok=True)
    row["reports"] = [str(json_path), str(md_path)]
    return row


COLUMNS = ("model", "key", "emulated", "latency_ms_median", "latency_ms_p90", "runs", "bitexact", "top1",
           "instructions")


def write_reports(out_dir: Path, key: str, row: dict) -> tuple[Path, Path]:
    """Add (or replace) the model's row in reports/device_<key>.json and rewrite the Markdown twin; benchmarks
    running at once take turns (a lock file beside the report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f".device_{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge_reports(out_dir, key, row)


def _plan_label(row: dict) -> str:
    """'method WbAb', with the mode where it is not partial."""
    cal = row.get("calibration") or {}
    mode = cal.get("mode") or "partial"
    return f"{cal.get('method')} W{cal.get('wbits')}A{cal.get('abits')}" + ("" if mode == "partial" else f" {mode}")


def _is_mcu(row: dict) -> bool:
    """Whether a report row is of a microcontroller board (firmware, no latency)."""
    return row.get("kind") == "mcu"


def _merge_reports(out_dir: Path, key: str, row: dict) -> tuple[Path, Path]:
    path = out_dir / f"device_{key}.json"
    rows = []
    if path.is_file():
        try:
            rows = json.loads(path.read_text()).get("rows", [])
        except json.JSONDecodeError:
            rows = []
    rows = [r for r in rows if (r.get("model"), r.get("calibration"), r.get("target")) !=
            (row["model"], row["calibration"], row["target"])] + [row]
    write_json(path, {"generated_by": "python -m hyq_tvm.bench", "key": key, "rows": rows})
    md = out_dir / f"device_{key}.md"
    lines = [f"# Device benchmark: key `{key}`", ""]
    if any(r.get("emulated") and not _is_mcu(r) for r in rows):
        lines += ["**EMULATED** rows ran under qemu-user on an x86-64 host, not on the real board: their "
                  "wall-clock latencies say nothing about real hardware. Instruction counts (where given) are "
                  "the aarch64 instructions executed per inference in the model library and libm, counted on the "
                  "emulated CPU (see each row's note).", ""]
    if any(r.get("emulated") and _is_mcu(r) for r in rows):
        lines += ["**EMULATED** microcontroller rows ran their firmware on the board's QEMU machine "
                  "(qemu-system-arm), not on the real board: they have no latency; their instructions are the "
                  "Cortex-M instructions one inference executes, counted exactly by QEMU (not cycles).", ""]
    lines += ["Generated by `python -m hyq_tvm.bench`. bitexact: every device output equals the host twin of the "
              "same integer graph bit for bit; top1: accuracy of the device's outputs.", "",
              "| model | W/A | key | device | latency median ms | p90 ms | runs | bitexact | top1 % | images | instructions |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = " (emulated)" if r.get("emulated") else ""
        if _is_mcu(r):
            dev = f"EMULATED ({r.get('board')}, {r['target']} on qemu-system-arm -M {r.get('qemu_machine')})" \
                if r.get("emulated") else f"{r.get('board')} ({r['target']})"
            latency = "n/a | n/a | n/a"
        else:
            dev = f"EMULATED ({r.get('board')}, qemu -cpu {r.get('qemu_cpu')})" if r.get("emulated") else str(r.get("board"))
            latency = f"{r['latency_ms_median']}{label} | {r['latency_ms_p90']}{label} | {r['runs']}"
        lines.append(f"| {r['model']} | {_plan_label(r)} | {r['key']} | {dev} | {latency} | "
                     f"{'yes' if r['bitexact'] else 'NO'} ({r['bitexact_images']}/{r['images']}) | {r['top1']:.2f} | "
                     f"{r['images']} | {r['instructions'] if r['instructions'] is not None else 'n/a'} |")
    notes = [f"- {r['model']} {_plan_label(r)}: instructions: {r['instructions_note']}" for r in rows
             if r.get("instructions_note")]
    lines += ["", *notes, ""]
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(lines))
    return path, md


# --- main ------------------------------------------------------------------------------------------------
def bench(tracker: str, key: str, artifact: str | Path, limit: int = DEFAULT_LIMIT, timeout: float = DEFAULT_TIMEOUT,
          repeat: int = 10, data: str | None = None, reports: str | Path = "reports", state_file: Path | None = None,
          icount_images: int = 8, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
          ) -> dict:
    """Benchmark the Linux-board `artifact` on a device for `key`; returns the report row (an MCU artifact:
    hyq_tvm.mcu.remote.bench_mcu)."""
    t_start = time.perf_counter()
    thost, tport = parse_addr(tracker)
    art = load_artifact(Path(artifact))
    info = device_info(key, (thost, tport), state_file)
    mcu = next((b["board"] for b in info.entries if b.get("kind") == "mcu"), key if is_mcu_target(key) else None)
    if mcu:
        raise HyqError(f"key {key!r} is the MCU board {mcu}, which runs firmware, not model.so: not uploaded; compile "
                       f"the plan for it (python -m hyq_tvm.compile --plan PLAN --target {mcu}) and bench that folder")
    if info.arch is not None and info.arch != art.arch:
        raise HyqError(f"artifact {art.path} is built for {art.arch} (model.so) but key {key!r} is {info.arch}: "
                       f"not uploaded; compile it with --target {key}")
    check_positive(limit, "--limit")
    check_tracker(thost, tport)
    if info.arch is None:
        log(f"warning: the architecture of key {key!r} is unknown (not a target in targets/ nor a board of the "
            f"fleet state); model.so ({art.arch}) is not checked against it")
    import tvm

    from .. import data as datasets

    pm = art.plan_model
    dataset = datasets.open_dataset(data, "test", pm["img_size"], pm["mean"], pm["std"])
    indices = datasets.balanced_indices(dataset.targets, limit).tolist()
    log(f"{len(indices)} of {len(dataset)} test images (seeded, balanced over the classes)")
    x0 = dataset[0][0][None].numpy().astype("float32")
    remote = Remote((thost, tport), key, art, timeout, info, log, state_file)
    latency = remote.call("latency", lambda: measure_latency(remote, x0, repeat))
    log(f"latency{' (EMULATED)' if info.emulated else ''}: median {latency['latency_ms_median']} ms, "
        f"p90 {latency['latency_ms_p90']} ms over {latency['runs']} runs")
    host_vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(art.host_library)), tvm.cpu())

    work_id = f"{key}-{art.model}-{sha256_file(art.library)[:12]}-{sha256_file(art.host_library)[:12]}"
    header = {"library": sha256_file(art.library), "host_library": sha256_file(art.host_library),
              "dataset": getattr(dataset, "name", str(data)), "key": key}
    work = WorkFile(Path(reports) / ".work" / f"{work_id}.jsonl", header)

    def run(part: list[int]) -> list[dict]:
        (i,) = part
        x, label = dataset[i]
        x = x[None].numpy().astype("float32")
        got = remote.call(f"image {i}", lambda: remote.run(x))
        return [image_row(i, label, got, host_vm["main"](tvm.runtime.tensor(x)).numpy())]

    run_images(indices, work, run, log)
    instructions, note = count_instructions(remote, x0, icount_images, log)
    remote.close()
    row = {"model": art.model, "key": key, "emulated": bool(info.emulated), **latency,
           **accuracy([work.done[i] for i in indices]), "instructions": instructions, "instructions_note": note,
           "board": info.board, "qemu_cpu": info.qemu_cpu, "arch": art.arch, "target": art.meta.get("target", {}).get("name"),
           "calibration": calibration(art.meta), "artifact": str(art.path), "library_sha256": header["library"],
           "sessions": remote.connects, "bench_seconds": round(time.perf_counter() - t_start, 1)}
    if info.emulated:
        row["note"] = "EMULATED: qemu-user on x86-64; wall-clock latency says nothing about the real board"
    return finish(Path(reports), key, row, work)
