"""Group-limited routing and the expert bias are part of the model (they choose the experts): a resume that changes
them is refused in one line naming the flag (megallama.checkpointing.compat); the bias's update rate only trains."""
import subprocess
import sys

ROOT = __file__.rsplit("/tests/", 1)[0]


def _base(tmp_path):
    return [sys.executable, f"{ROOT}/pretrain_llama.py", "--model", "tiny_llama3_50m", "--num-layers", "2",
            "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups",
            "2", "--seq-length", "32", "--micro-batch-size", "2", "--mock-data", "--no-progress-bar", "--device",
            "cpu", "--num-experts", "4", "--moe-router-score-function", "sigmoid", "--train-iters", "2",
            "--save", str(tmp_path)]


def test_resume_without_group_routing_names_the_flag(tmp_path):
    base = _base(tmp_path)
    subprocess.run(base + ["--moe-router-num-groups", "2", "--moe-router-group-topk", "1"], check=True,
                   capture_output=True)
    out = subprocess.run(base + ["--load", str(tmp_path), "--train-iters", "3"], capture_output=True, text=True)
    assert out.returncode != 0
    text = out.stderr + out.stdout
    assert "--moe-router-num-groups" in text and "resuming would change the model" in text, text[-800:]
    assert "Traceback" not in text, text[-800:]
