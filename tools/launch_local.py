"""Starts N real processes of one command on this machine, joined through `jax.distributed`.

    python -m tools.launch_local --num_processes 2 --devices_per_process 4 -- \
        python -m experiments.run --config configs/pretrain/tiny.py --workdir runs/two

Each process gets JAX_COORDINATOR_ADDRESS (a free local port), JAX_NUM_PROCESSES, JAX_PROCESS_ID
and, on CPU, `--xla_force_host_platform_device_count` in XLA_FLAGS; `experiments.run` joins them
(CPU collectives through gloo). For tests and debugging of multi-process code on one machine.
Process 0 prints as usual, the others' lines are prefixed with their index. When one process
exits with an error the others are stopped; SIGTERM and SIGINT are passed on to all. The exit
code is the first non-zero one, else 0.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, index: int, count: int, port: int, devices: int) -> dict:
    """The environment of process `index`: the coordinator variables and the CPU device count."""
    env = dict(base)
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index)
    )
    if devices > 0:
        flags = [
            f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
        ]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def _relay(stream, prefix: str):
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.buffer.flush()


def launch(command: list, num_processes: int, devices_per_process: int) -> int:
    """Runs `command` as `num_processes` joined processes; returns the exit code."""
    port = free_port()
    procs, relays = [], []
    for i in range(num_processes):
        env = process_env(os.environ, i, num_processes, port, devices_per_process)
        out = None if i == 0 else subprocess.PIPE
        p = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if i else None)
        procs.append(p)
        if out is not None:
            relays.append(threading.Thread(target=_relay, args=(p.stdout, f"[{i}] "), daemon=True))
            relays[-1].start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    code = 0
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and code == 0:
            code = failed[0]
            for p in procs:  # a peer waiting in a collective would otherwise hang
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.2)
    for t in relays:
        t.join(timeout=5)
    return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(
            "error: usage: python -m tools.launch_local [--num_processes N] [--devices_per_process D] "
            "-- COMMAND ...",
            file=sys.stderr,
        )
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(description="N joined processes of one command on this machine.")
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument(
        "--devices_per_process",
        type=int,
        default=0,
        help="CPU devices each process simulates (0: leave XLA_FLAGS alone)",
    )
    args = p.parse_args(argv[:split])
    command = argv[split + 1 :]
    if args.num_processes < 1 or not command:
        print("error: --num_processes must be >= 1 and a command must follow --", file=sys.stderr)
        return 2
    return launch(command, args.num_processes, args.devices_per_process)


if __name__ == "__main__":
    sys.exit(main())
