"""What the per-step signal check costs under torchrun: `StopFlag.poll`, an all-reduce of two integers.

    torchrun --nproc_per_node 2 bench/bench_stop_poll.py             # CPU ranks (gloo)
    torchrun --nproc_per_node 2 bench/bench_stop_poll.py --device cuda  # GPU ranks: the flags still go through gloo

Every rank calls `poll` at every step so that a signal (torchrun forwards
SIGTERM, then kills 30 s later) is acted on at the next step boundary. This
times that call alone, as the loop makes it, and prints the median and the
99th percentile in microseconds; compare them with a step's time.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t5dialog import distributed  # noqa: E402
from t5dialog.cli import OneLineParser, UserError, run_script  # noqa: E402


def run(argv) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=2000, help="calls timed, after 100 not timed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the ranks' device; the flags stay on the host)")
    args = parser.parse_args(argv)
    rank, world, device = distributed.setup(args.device)
    if world < 2:
        raise UserError("run it under torchrun with 2 or more processes: torchrun --nproc_per_node 2 bench/bench_stop_poll.py")
    stop = distributed.StopFlag()
    try:
        for _ in range(100):
            stop.poll(world)
        times = []
        for _ in range(args.polls):
            start = time.perf_counter()
            stop.poll(world)
            times.append(time.perf_counter() - start)
    finally:
        stop.restore()
    if rank == 0:
        times.sort()
        print(f"StopFlag.poll, {world} ranks on {device}: median {statistics.median(times) * 1e6:.0f} us, "
              f"p99 {times[int(0.99 * len(times))] * 1e6:.0f} us over {args.polls} calls")
    return 0


def main(argv=None) -> int:
    try:
        return run_script("bench_stop_poll.py", run, argv)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
