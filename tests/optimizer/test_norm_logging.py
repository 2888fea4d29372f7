"""--log-params-norm and --log-num-zeros-in-grad (Megatron's) count every element once in the world: under tp x dp
(ZeRO-1) and pp x dp the logged values equal the single process's (the zeros are the unseen tokens' embedding
rows, exactly zero in every layout)."""
import contextlib
import io
import re

from dist_utils import run_distributed

ARGV = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "2", "--lr", "1e-2",
        "--lr-warmup-iters", "1", "--mock-data", "--no-progress-bar", "--device", "cpu",
        "--untie-embeddings-and-output-weights", "--log-params-norm", "--log-num-zeros-in-grad"]
LAYOUTS = {"tp2_dp2_zero1": ["--tensor-model-parallel-size", "2", "--zero-stage", "1"],
           "pp2_dp2": ["--pipeline-model-parallel-size", "2"]}
# Megatron's formats: num zeros "{:.1f}", params norm "{:.3f}" (so the logged norms agree to the printed digits)
LINE = re.compile(r"iteration\s+(\d+)/.*\| num zeros: ([0-9.]+) \| params norm: ([0-9.]+) \|")
PRINTED = 1.5e-3


def _logged(argv, world):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pretrain(parse_args(ARGV + argv, world_size=world))
    return {int(i): (int(float(z)), float(n)) for i, z, n in LINE.findall(buf.getvalue())}


def _parallel(rank, world):
    from megallama.mpu import parallel_state as ps
    out = {}
    for name, flags in LAYOUTS.items():
        out[name] = _logged(flags, world)
        ps.destroy_model_parallel()
    return out


def test_params_norm_and_zeros_count_each_element_once():
    ref = _logged([], 1)
    assert sorted(ref) == [1, 2] and all(z > 0 for z, _ in ref.values()), ref
    got = run_distributed(_parallel, 4)[3]  # the log line: Megatron's last rank's
    for name in LAYOUTS:
        for step, (zeros, norm) in ref.items():
            z, n = got[name][step]
            assert z == zeros, (name, step, z, zeros)
            assert abs(n - norm) <= PRINTED, (name, step, n, norm)


def _chimera(rank, world, argv):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    out = pretrain(parse_args(argv + ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "chimera"],
                              world_size=world))
    return out["losses"], out["grad_norms"], _logged(["--pipeline-model-parallel-size", "2", "--pipeline-schedule",
                                                      "chimera"] + argv[len(ARGV):], world)


def test_chimera_counts_its_replica_chunk_once():
    """Chimera keeps a replica of another stage's layers: the grad norm (and so clipping, here active at 0.5),
    the params norm and the zero count take each element once, as one process does (they were sqrt(2), and 2x)."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    argv = ARGV + ["--clip-grad", "0.5", "--train-iters", "3", "--micro-batch-size", "1", "--global-batch-size", "4"]
    ref = pretrain(parse_args(argv, world_size=1))
    ref_logged = _logged(argv[len(ARGV):], 1)
    losses, norms, logged = run_distributed(_chimera, 2, argv)[1]
    assert all(n > 0.5 for n in ref["grad_norms"].values())  # clipping acts on every step
    for i in (1, 2, 3):
        assert abs(norms[i] - ref["grad_norms"][i]) <= 1e-5 * ref["grad_norms"][i], (i, norms, ref["grad_norms"])
        assert abs(losses[i] - ref["losses"][i]) <= 1e-5 * ref["losses"][i]
        assert logged[i][0] == ref_logged[i][0] and abs(logged[i][1] - ref_logged[i][1]) <= PRINTED
