"""An MCU artifact benchmarked on a microcontroller board behind a TVM RPC tracker (python -m hyq_tvm.bench with a
folder of python -m hyq_tvm.compile --target BOARD).

The firmware is built here (firmware.build_emulated, for the board's QEMU machine) and uploaded into a session of
the board's server (hyq_tvm.mcu.server), after the server has said it is the artifact's board; the test images
(the seeded class-balanced subset of the Linux bench), quantized on the artifact's input grid, run through
hyq.mcu.run a chunk at a time, and every output is compared bit for bit with the host integer graph (host.so).
Sessions, reconnects, the resumable work file and the reports are hyq_tvm.devices.bench's; the row has the
instructions one inference executes (EMULATED: exact QEMU counts, not cycles) instead of a latency.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..artifact import HOST_LIBRARY, METADATA, PLAN
from ..devices.bench import (DEFAULT_LIMIT, DEFAULT_TIMEOUT, DeviceInfo, Remote, WorkFile, accuracy, calibration,
                             check_tracker, device_info, finish, image_row, run_images)
from ..devices.fleet import parse_addr
from ..errors import HyqError, check_positive
from ..fileio import sha256_file
from .boards import load_board
from .server import INFO, RUN, unpack_result

MCU_FORMAT = "hyq-tvm/mcu"  # metadata.json's format of an MCU C folder (hyq_tvm.mcu.build)
DEFAULT_CHUNK = 8


@dataclass(frozen=True)
class McuArtifact:
    """An MCU C folder: its metadata, the plan's model facts and the host integer graph of the same int8 ends."""

    path: Path
    meta: dict
    plan_model: dict
    host_library: Path

    @property
    def model(self) -> str:
        return self.meta.get("model") or self.plan_model["name"]

    @property
    def board(self) -> str:
        return self.meta["board"]

    def shape(self, end: str) -> tuple[int, ...]:
        """The shape of the graph's "input" or "output"."""
        return tuple(self.meta[end]["shape"])

    def grid(self, end: str):
        """The quantization grid (cgraph.Grid) of the graph's "input" or "output"."""
        from .cgraph import Grid

        g = self.meta[end]
        return Grid(tuple(g["scale"]), tuple(g["zero_point"]), int(g["axis"]))


def is_mcu_artifact(path: Path) -> bool:
    """Whether `path` is an MCU C folder (metadata format hyq-tvm/mcu)."""
    try:
        return json.loads((path / METADATA).read_text()).get("format") == MCU_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_mcu_artifact(path: Path) -> McuArtifact:
    """The MCU C folder at `path`; HyqError when its plan or host twin is missing."""
    meta = json.loads((path / METADATA).read_text())
    files = meta.get("files", {})
    plan, host = path / files.get("plan", PLAN), path / files.get("host_library", HOST_LIBRARY)
    for f in (plan, host):
        if not f.is_file():
            raise HyqError(f"MCU artifact {path} lacks {f.name}: compile it again with python -m hyq_tvm.compile "
                           f"--target {meta.get('board')}")
    load_board(meta.get("board", ""))
    return McuArtifact(path, meta, json.loads(plan.read_text())["model"], host)


def dequantize(q: np.ndarray, grid) -> np.ndarray:
    """The real values scale * (q - zero_point) of int8 `q` on `grid` (per tensor or per channel)."""
    shape = [-1 if d == grid.axis % q.ndim else 1 for d in range(q.ndim)] if len(grid.scale) > 1 else []
    scale = np.asarray(grid.scale, np.float64).reshape(shape)
    return scale * (q.astype(np.float64) - np.asarray(grid.zero_point, np.float64).reshape(shape))


def server_error(err: Exception, key: str) -> HyqError:
    """One line from an error the MCU server raised (TVM's RPCError: the server's message after its header)."""
    message = str(err).split("Error caught from RPC call:", 1)[-1]
    return HyqError(f"the MCU server for key {key!r}: {' '.join(message.split())}")


def server_info(sess, key: str) -> dict:
    """What the session's server says of its board (hyq.mcu.info); HyqError when it is not an MCU board's."""
    from tvm.error import RPCError

    try:
        info = sess.get_function(INFO)
    except AttributeError:
        raise HyqError(f"the server for key {key!r} is not an MCU board's (it has no {INFO}): start one with "
                       f"python -m hyq_tvm.device start BOARD") from None
    try:
        return json.loads(info())
    except RPCError as err:
        raise server_error(err, key) from None


class McuRemote(Remote):
    """A session with the artifact's board (checked before the upload) and its firmware uploaded; vm: hyq.mcu.run."""

    loaded = "uploaded the firmware"

    def __init__(self, tracker: tuple[str, int], key: str, art: McuArtifact, elf: Path, timeout: float,
                 info: DeviceInfo, log: Callable[[str], None], state_file: Path | None = None):
        super().__init__(tracker, key, art, timeout, info, log, state_file)
        self.elf, self.elf_name = elf, f"hyq-{sha256_file(elf)[:12]}.elf"
        self.server: dict = {}

    def load(self, sess):
        server = server_info(sess, self.key)
        if server.get("board") != self.art.board:
            raise HyqError(f"artifact {self.art.path} is built for the MCU board {self.art.board} but the server of "
                           f"key {self.key!r} ({self.info.board}) is {server.get('board')}: not uploaded; compile the "
                           f"plan with --target {server.get('board')} or bench with the key of a {self.art.board}")
        self.server, self.info.emulated = server, bool(server.get("emulated"))
        sess.upload(str(self.elf), self.elf_name)
        return sess.get_function(RUN)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, int | None]:
        """The outputs (one row per input) and instructions per inference of int8 `inputs` (N, ...) on the board."""
        from tvm.error import RPCError

        try:
            raw = bytes(self.vm(self.elf_name, inputs.tobytes(), len(inputs)))
        except RPCError as err:
            raise server_error(err, self.key) from None
        outputs, instructions = unpack_result(raw, len(inputs))
        if outputs.shape[1] != int(np.prod(self.art.shape("output"))):
            raise HyqError(f"the board gave {outputs.shape[1]} bytes per output, the artifact's output has "
                           f"{int(np.prod(self.art.shape('output')))}: rebuild the artifact")
        return outputs, instructions


def _check_key(art: McuArtifact, key: str, info: DeviceInfo) -> None:
    """A HyqError (nothing uploaded) when the fleet state or the targets say `key` is another board."""
    if info.arch is not None:
        board = info.entries[0]["board"] if info.entries else key
        raise HyqError(f"key {key!r} is the Linux board {board} but artifact {art.path} is firmware for the MCU board "
                       f"{art.board}: not uploaded; start that board (python -m hyq_tvm.device start {art.board}) "
                       f"and bench with --key {art.board}")
    for entry in info.entries:
        if entry["board"] != art.board:
            raise HyqError(f"artifact {art.path} is built for the MCU board {art.board} but key {key!r} is "
                           f"{entry['board']}: not uploaded; compile the plan with --target {entry['board']} or "
                           f"bench with the key of a {art.board}")


def _instructions(rows: list[dict], remote: McuRemote) -> tuple[int | None, str]:
    """The instructions per inference of the row (mean over the images) and its note."""
    counts = [r["instructions"] for r in rows if r.get("instructions") is not None]
    if len(counts) < len(rows):
        return None, "not counted by the board"
    mean = round(sum(counts) / len(counts))
    note = (f"instructions one hyq_model_run call executes on qemu-system-arm -M {remote.server.get('qemu_machine')} "
            f"(QEMU TCG plugin: a run of the firmware minus a run that skips the model), exact counts, not cycles; "
            f"mean over {len(counts)} images of the means of the runs that ran them")
    if min(counts) != max(counts):
        note += f"; the runs' means range from {min(counts)} to {max(counts)}"
    return mean, (f"EMULATED: {note}" if remote.info.emulated else note)


def bench_mcu(tracker: str, key: str, artifact: str | Path, limit: int = DEFAULT_LIMIT,
              timeout: float = DEFAULT_TIMEOUT, data: str | None = None, reports: str | Path = "reports",
              state_file: Path | None = None, chunk: int = DEFAULT_CHUNK,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """Benchmark the MCU artifact on the board of `key`, `chunk` images per run; returns the report row."""
    import tvm

    from .. import data as datasets
    from .build import quantize_input
    from .firmware import build_emulated

    t_start = time.perf_counter()
    thost, tport = parse_addr(tracker)
    art = load_mcu_artifact(Path(artifact))
    check_positive(limit, "--limit")
    check_positive(chunk, "--chunk")
    info = device_info(key, (thost, tport), state_file)
    _check_key(art, key, info)
    check_tracker(thost, tport)
    pm = art.plan_model
    dataset = datasets.open_dataset(data, "test", pm["img_size"], pm["mean"], pm["std"])
    indices = datasets.balanced_indices(dataset.targets, limit).tolist()
    log(f"{len(indices)} of {len(dataset)} test images (seeded, balanced over the classes)")
    board = load_board(art.board)
    with tempfile.TemporaryDirectory(prefix="hyq-bench-") as tmp:
        t0 = time.perf_counter()
        elf = build_emulated(art.path, board, Path(tmp) / "model.elf")
        log(f"built the firmware for {board.name} (qemu-system-arm -M {board.qemu_machine}) in "
            f"{time.perf_counter() - t0:.1f} s")
        remote = McuRemote((thost, tport), key, art, elf, timeout, info, log, state_file)
        remote.call("session", lambda: None)  # the board checked and the firmware uploaded before any image
        host_vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(art.host_library)), tvm.cpu())
        elf_sha, host_sha = sha256_file(elf), sha256_file(art.host_library)
        header = {"elf": elf_sha, "host_library": host_sha, "dataset": getattr(dataset, "name", str(data)), "key": key}
        work = WorkFile(Path(reports) / ".work" / f"{key}-{art.model}-{elf_sha[:12]}-{host_sha[:12]}.jsonl", header)
        in_grid, out_grid = art.grid("input"), art.grid("output")

        def run(part: list[int]) -> list[dict]:
            images, labels = zip(*(dataset[i] for i in part))
            q = quantize_input(np.stack([x.numpy() for x in images]).astype(np.float32), in_grid)
            got, instructions = remote.call(f"images {part[0]}-{part[-1]}",
                                            lambda: remote.run(q.reshape(len(part), -1)))
            log(f"{len(part)} images on {info.board}: {instructions} instructions per inference")
            rows = []
            for i, label, x, out in zip(part, labels, q, got):
                want = host_vm["main"](tvm.runtime.tensor(x.reshape(art.shape("input")))).numpy()
                rows.append({**image_row(i, label, out.reshape(want.shape), want, lambda y: dequantize(y, out_grid)),
                             "instructions": instructions})
            return rows

        run_images(indices, work, run, log, chunk)
    remote.close()
    done = [work.done[i] for i in indices]
    instructions, note = _instructions(done, remote)
    row = {"model": art.model, "key": key, "kind": "mcu", "emulated": bool(info.emulated), **accuracy(done),
           "instructions": instructions, "instructions_note": note, "board": info.board,
           "qemu_machine": remote.server.get("qemu_machine"), "cpu": remote.server.get("cpu"), "target": art.board,
           "calibration": calibration(art.meta), "artifact": str(art.path), "elf_sha256": elf_sha, "chunk": chunk,
           "sessions": remote.connects, "bench_seconds": round(time.perf_counter() - t_start, 1)}
    if info.emulated:
        row["note"] = (f"EMULATED: firmware on qemu-system-arm -M {row['qemu_machine']}, not on the real board: "
                       f"instructions, not cycles; no latency")
    return finish(Path(reports), key, row, work)
