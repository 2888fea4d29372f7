"""One benchmark worker for megallama: real training iterations through ``megallama.training.pretrain`` on mock
data (no separate loop), printing one JSON line with the median step time and peak memory."""
import json
import sys

from megallama.arguments import parse_args
from megallama.training import pretrain


def main(argv):
    args = parse_args(argv + ["--mock-data", "--no-progress-bar", "--log-interval", "1", "--lr-warmup-iters", "0"])
    out = pretrain(args)
    times = sorted(list(out["iteration_time"].values())[3:] or out["iteration_time"].values())
    step = times[len(times) // 2]
    print(json.dumps({"impl": "megallama", "step_time_s": step, "tokens_per_s": out["tokens_per_iteration"] / step,
                      "peak_mem_gib": None if out["peak_memory_bytes"] is None else out["peak_memory_bytes"] / 2**30,
                      "final_loss": out["losses"][max(out["losses"])], "flops_per_token": out["flops_per_token"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
