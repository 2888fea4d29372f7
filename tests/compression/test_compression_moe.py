"""Gradient compression with MoE expert parallelism (4 gloo ranks: dp 4, ep 2, so the expert-data-parallel group
has 2 ranks). Expert buckets are reduced exact over that group, never by the comm hook; so

* 1-bit Adam must step the expert weights with plain AdamW: its compressed steps take the hook's averaged momentum
  as ``exp_avg``, and an expert's exact gradient taken as the momentum threw the momentum away (m = g) and left v
  frozen;
* the log says which gradients go exact, and the bytes per step count the expert all-reduce (it was left out, so
  a 1.5x step claimed 5x).
"""
import contextlib
import io
import re

from dist_utils import run_distributed

ARGV = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--train-iters", "5", "--lr", "1e-2", "--lr-warmup-iters", "1", "--mock-data",
        "--no-progress-bar", "--device", "cpu", "--log-interval", "1", "--num-experts", "4",
        "--expert-model-parallel-size", "2", "--gradient-compression", "onebit", "--compression-warmup-steps", "2"]


def _run(rank, world):
    from megallama.arguments import parse_args
    from megallama.mpu import parallel_state as ps
    from megallama.optimizer import compression_onebit as cob
    from megallama.training import pretrain
    import torch
    captured, records = {}, []
    install = cob.install_onebit_adam

    def capture(dist_opt, *a, **kw):
        captured["opt"] = dist_opt
        return install(dist_opt, *a, **kw)
    cob.install_onebit_adam = capture
    step = cob.OneBitAdamW.step

    def recording_step(self, closure=None):
        """Checks, for every expert master with state, the step's exp_avg and exp_avg_sq against AdamW's."""
        beta1, beta2 = self.param_groups[0]["betas"]
        experts = [pc.master for pc in captured["opt"].pieces if pc.comm.expert]
        before = {p: (p.grad.clone(), self.state[p]["exp_avg"].clone(), self.state[p]["exp_avg_sq"].clone())
                  for p in experts if self.state.get(p)}
        out = step(self, closure)
        for p, (g, m, v) in before.items():
            ok_m = torch.allclose(self.state[p]["exp_avg"], m.lerp(g, 1 - beta1), rtol=1e-6, atol=1e-9)
            ok_v = torch.allclose(self.state[p]["exp_avg_sq"], v * beta2 + (1 - beta2) * g * g, rtol=1e-6,
                                  atol=1e-12)
            records.append((int(self.state[p]["step"]), ok_m, ok_v))
        return out
    cob.OneBitAdamW.step = recording_step
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pretrain(parse_args(ARGV, world_size=world))
    layout = captured["opt"].chunks[0].layout
    sizes = [sum(b.numel for b in layout.buckets if b.comm.expert == e) for e in (False, True)]
    ps.destroy_model_parallel()
    return records, buf.getvalue(), sizes


def test_expert_gradients_go_exact_and_onebit_steps_them_with_adamw():
    res = run_distributed(_run, 4)
    for rank, (records, _, _) in res.items():
        bad = [r for r in records if not (r[1] and r[2])]
        assert not bad, (rank, "expert (step, exp_avg ok, exp_avg_sq ok) unlike AdamW's", bad)
        assert len(records) >= 6 * 3, (rank, records)  # 6 expert tensors, steps 2-5 (step 3 is 1-bit compressed)
    assert "the 6 MoE expert parameters (98304 elements) are reduced exact over the expert-data-parallel group" \
        in res[0][1], res[0][1]  # a start-up line: rank 0's
    log, (dense, expert) = res[3][1], res[3][2]  # the log line (and its bytes): the last rank's
    mb = [float(x) for x in re.findall(r"grad comm MB/step: ([0-9.]+)", log)]
    # step 1 is exact: fp32 all-reduces, the dense buffer over dp 4 and the expert one over expert-dp 2
    assert abs(mb[0] - (2 * 3 / 4 * 4 * dense + 2 * 1 / 2 * 4 * expert) / 1e6) < 1e-4, (mb, dense, expert)
