"""Benchmark an artifact on a device behind a TVM RPC tracker (python -m hyq_tvm.bench).

  python -m hyq_tvm.bench --tracker 127.0.0.1:9190 --key rasp4b --artifact artifacts/mobilevit_xxs-rasp4b

Requests a session for --key from the tracker (waiting at most --timeout s for a free device), refuses
an artifact whose model.so is built for another architecture than the key's (before any upload),
uploads model.so, measures latency with time_evaluator, then runs --limit Fashion-MNIST test images (a seeded
subset balanced over the classes) on the device and compares every output bit for bit with the host twin of the
same integer graph (host.so in the artifact; model.so itself for a host artifact). Top-1 accuracy is the device's.
Writes reports/device_<key>.json and .md (one row per model). Boards started by hyq_tvm.device are
labelled emulated: their wall-clock times say nothing about real hardware; on a board started with --icount
the row also gets the exact number of instructions one inference executes in model.so and libm (QEMU plugin).

An MCU artifact (python -m hyq_tvm.compile --target stm32h743 ...) goes to a microcontroller board's server
(python -m hyq_tvm.device start stm32h743): its firmware is built here for the board's QEMU machine, uploaded, and the
test images run through it --chunk at a time, every output checked bit for bit against host.so; the row has the
instructions one inference executes (EMULATED: exact QEMU counts, not cycles) and no latency.

A lost RPC session (the server died) is reconnected through the tracker in every phase: latency and instruction
counts are measured again in the new session; finished images go to a work file (reports/.work/...), so a
reconnect, or a rerun, continues with the next unfinished image and counts none twice.

--compare-ort (emulated boards started with --icount): then counts onnxruntime (the board rootfs's aarch64 wheel,
one thread) on the FP32 and the plan's QDQ int8 ONNX models, same input, and writes
reports/benchmark_<board>.json and .md: instructions per inference of the three engines, their ratios, MACs
per layer and instructions per MAC, all EMULATED (a few more minutes).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..devices.bench import DEFAULT_LIMIT, DEFAULT_TIMEOUT, bench
from ..devices.versus import check_icount_key, compare_ort
from ..errors import HyqError, check_positive
from ..mcu.remote import DEFAULT_CHUNK, bench_mcu, is_mcu_artifact


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hyq_tvm.bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracker", required=True, help="HOST:PORT of the TVM RPC tracker")
    p.add_argument("--key", required=True, help="device key registered with the tracker (e.g. rasp4b)")
    p.add_argument("--artifact", required=True, type=Path, help="artifact folder from python -m hyq_tvm.compile")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"test images to run, a seeded class-balanced subset (default {DEFAULT_LIMIT})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for a free device (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--repeat", type=int, default=10, help="time_evaluator repeats (default 10, number=1)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help=f"MCU artifact: test images per run on the board (default {DEFAULT_CHUNK})")
    p.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the system copy)")
    p.add_argument("--reports", type=Path, default=Path("reports"), help="where device_<key>.json/.md go")
    p.add_argument("--devices-state", type=Path, default=None,
                   help="state file of hyq_tvm.device (default: the cache's), to label emulated boards")
    p.add_argument("--compare-ort", action="store_true",
                   help="also count onnxruntime FP32 and int8 on the emulated board: reports/benchmark_<board>.*")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_positive(args.repeat, "--repeat")
    mcu = is_mcu_artifact(args.artifact)
    if args.compare_ort and mcu:
        raise HyqError("--compare-ort counts onnxruntime on an emulated Linux board; leave it out for an MCU artifact")
    if args.compare_ort:
        check_icount_key(args.tracker, args.key, args.devices_state)
    if mcu:
        row = bench_mcu(args.tracker, args.key, args.artifact, args.limit, args.timeout, args.data, args.reports,
                        args.devices_state, args.chunk or DEFAULT_CHUNK)
    else:
        row = bench(args.tracker, args.key, args.artifact, args.limit, args.timeout, args.repeat, args.data,
                    args.reports, args.devices_state)
    emu = " EMULATED" if row["emulated"] else ""
    if mcu:
        print(f"{row['model']} on {args.key}{emu} ({row['target']}, qemu-system-arm -M {row['qemu_machine']}): "
              f"bitexact {row['bitexact']} ({row['bitexact_images']}/{row['images']}); top-1 {row['top1']:.2f}% (host "
              f"{row['top1_host']:.2f}%) on {row['images']} test images; instructions per inference "
              f"{row['instructions']}{emu} (no latency: instructions, not cycles); -> {', '.join(row['reports'])}")
        return
    print(f"{row['model']} on {args.key}{emu}: latency median {row['latency_ms_median']} ms (p90 "
          f"{row['latency_ms_p90']}, {row['runs']} runs); bitexact {row['bitexact']} "
          f"({row['bitexact_images']}/{row['images']}); top-1 {row['top1']:.2f}% (host {row['top1_host']:.2f}%) on "
          f"{row['images']} test images; instructions {row['instructions']}; -> {', '.join(row['reports'])}")
    if args.compare_ort:
        vs = compare_ort(row, args.artifact, args.reports, args.devices_state, args.data)
        print(f"{vs['model']} {vs['img_size']} px on {vs['board']} EMULATED, instructions per inference: hyq-tvm int8 "
              f"{vs['hyq_int8_instructions']:,}, ort FP32 {vs['ort_fp32_instructions']:,} (hyq / ort "
              f"{vs['hyq_over_ort_fp32']:.3f}), ort int8 {vs['ort_int8_instructions']:,} (hyq / ort "
              f"{vs['hyq_over_ort_int8']:.3f}); {vs['macs']:,} MACs, hyq-tvm "
              f"{vs['instructions_per_mac']['hyq_int8']:.3f} instructions/MAC; -> {', '.join(vs['reports'])}")
