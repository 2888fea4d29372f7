"""The strategy line says what was done: a MoE run started from a dense --pretrained-checkpoint upcycles (its
experts start as copies of the dense MLP), and the line says so."""
from megallama.arguments import parse_args
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "1", "--no-progress-bar", "--device", "cpu", "--mock-data"]


def test_moe_from_a_dense_checkpoint_says_it_upcycled(tmp_path, capsys):
    pretrain(parse_args(TINY + ["--save", str(tmp_path / "dense")], world_size=1))
    capsys.readouterr()
    pretrain(parse_args(TINY + ["--strategy", "moe", "--num-experts", "2", "--pretrained-checkpoint",
                                str(tmp_path / "dense")], world_size=1))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("strategy moe"))
    assert "'upcycle': True" in line, line
    pretrain(parse_args(TINY + ["--strategy", "moe", "--num-experts", "2"], world_size=1))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("strategy moe"))
    assert "'upcycle': False" in line, line
