"""--load-adapter: a LoRA fine-tune continues from a saved adapter folder (its first steps compute exactly what the
run that wrote it computes next), loads it the same at tp 1, tp 2 and pp 2, a resume of the run loads its own
checkpoint's adapters instead, generate with base + adapter equals generate from the fine-tuned checkpoint, and
each bad input is one error line with exit 2."""
import os
import shutil

import pytest
import torch

from dist_utils import run_distributed
from loop_harness import pretrain_here

SMALL = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--micro-batch-size", "2", "--global-batch-size",
         "2", "--no-fused-kernels", "--no-progress-bar", "--device", "cpu", "--log-interval", "1", "--seed", "3",
         "--vocab-size", "8192", "--seq-length", "64"]


def _finetune(argv):
    return pretrain_here(argv, finetune=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base checkpoint, and a 2-step LoRA fine-tune of it that saved its checkpoint and its adapter folder."""
    tmp = tmp_path_factory.mktemp("adapter")
    base = str(tmp / "base")
    # frozen weights large enough for the adapters to move the logits
    pretrain_here(SMALL + ["--mock-data", "--train-iters", "1", "--save", base, "--init-method-std", "0.2"])
    lora = SMALL + ["--pretrained-checkpoint", base, "--strategy", "lora", "--split", "100,0,0", "--lr", "3e-2",
                    "--lr-warmup-iters", "0"]
    first = lora + ["--lora-rank", "4", "--lora-alpha", "16", "--lora-target-modules", "q_proj,v_proj,down_proj"]
    _finetune(first + ["--train-iters", "2", "--save", str(tmp / "ft"), "--save-interval", "2",
                       "--save-adapter", str(tmp / "adapter")])
    return {"tmp": tmp, "base": base, "ft": str(tmp / "ft"), "adapter": str(tmp / "adapter"), "lora": lora,
            "first": first}


def test_finetune_continues_from_the_adapter_and_a_resume_loads_its_own(runs, capsys, one_thread):
    """At lr 0 the --load-adapter run's step-3 loss is the loss of the adapter's weights on batch 3, which is what
    the run that wrote the adapter computes at its step 3 when resumed: equal only if every adapter tensor loaded.
    The rank, alpha and targets come from adapter_config.json (no --lora-* flags given)."""
    tmp = runs["tmp"]
    cont = runs["lora"] + ["--load-adapter", runs["adapter"], "--lr", "0", "--save", str(tmp / "cont"),
                           "--load", str(tmp / "cont"), "--save-interval", "3"]
    capsys.readouterr()
    got = _finetune(cont + ["--train-iters", "3"])["losses"]
    log = capsys.readouterr().out
    assert f"LoRA adapters start from {runs['adapter']}" in log, log
    assert "'lora_rank': 4" in log and "'lora_alpha': 16.0" in log, log
    resumed_ft = str(tmp / "ft_copy")
    shutil.copytree(runs["ft"], resumed_ft)
    ref = _finetune(runs["first"] + ["--train-iters", "3", "--save", resumed_ft, "--load", resumed_ft,
                                     "--override-opt-param-scheduler"])["losses"]
    assert sorted(ref) == [3]
    assert abs(got[3] - ref[3]) <= 1e-6 * abs(ref[3]), (got, ref)
    # the same command relaunched resumes its own checkpoint (resume wins): the folder is not read again
    capsys.readouterr()
    more = _finetune(cont + ["--train-iters", "4", "--override-opt-param-scheduler"])["losses"]
    log = capsys.readouterr().out
    assert sorted(more) == [4] and "resumed from" in log, log
    assert "its checkpoint's adapters are loaded, not those of --load-adapter" in log, log
    assert "LoRA adapters start from" not in log, log


def _lora_tensors_worker(rank, world, argv):
    import finetune_llama
    from megallama.arguments import parse_args
    from megallama.initialize import initialize_megatron
    from megallama.model.lora import gather_lora_state_dict
    from megallama.training_setup import build_model_chunks
    args = finetune_llama.prepare_finetune_args(parse_args(list(argv), world_size=world))
    chunks = build_model_chunks(args, initialize_megatron(args))
    return {k: v.numpy() for k, v in gather_lora_state_dict(chunks).items()}  # numpy: tensors would be shared


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]])
def test_tp2_and_pp2_load_equals_tp1(runs, layout, one_thread):
    """The scripts' model build under --load-adapter: the full adapter tensors gathered from tp 2 (each rank its
    split) and from pp 2 (each stage its own layer's) equal the tp 1 load's, which equal the folder's."""
    from safetensors.torch import load_file
    argv = runs["lora"] + ["--load-adapter", runs["adapter"], "--train-iters", "1"]
    saved = {k[len("base_model.model."):]: v for k, v in
             load_file(os.path.join(runs["adapter"], "adapter_model.safetensors")).items()}
    one = _lora_tensors_worker(0, 1, argv)  # tp 1, in this process
    two = run_distributed(_lora_tensors_worker, 2, argv + layout)[0]
    assert sorted(one) == sorted(two) == sorted(saved) and len(saved) == 2 * 3 * 2
    for k in saved:
        assert torch.equal(torch.from_numpy(one[k]), saved[k]) and torch.equal(torch.from_numpy(two[k]), saved[k]), k
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # trained: B moved off zero


def test_generate_with_base_plus_adapter_equals_the_finetuned_checkpoint(runs, capsys, one_thread):
    from megallama.generation import SamplingConfig, generate
    from megallama.generation_cli import load_for_generation, main
    argv = ["--device", "cpu", "--prompt", "The module", "--prompt", "Return", "--max-new-tokens", "6", "--greedy"]
    outs = []
    for load in (["--load", runs["base"], "--load-adapter", runs["adapter"]], ["--load", runs["ft"]]):
        capsys.readouterr()
        assert main(load + argv) == 0
        out = capsys.readouterr().out
        outs.append(out[out.index("--- prompt:"):])
    assert outs[0] == outs[1] and outs[0].count("--- prompt:") == 2, outs
    # the logits too, and the adapter does change them (the comparison above is not of two base models)
    cfg = SamplingConfig(max_new_tokens=4, temperature=0)
    prompts = [[5, 9, 2, 7], [11, 3]]
    logits = [torch.stack([torch.stack(batch, 1) for batch in generate(
        load_for_generation(*a, device="cpu", **kw).model, prompts, cfg, return_logits=True)[1]])
              for a, kw in (((runs["base"],), {"adapter": runs["adapter"]}), ((runs["ft"],), {}),
                            ((runs["base"],), {}))]
    assert torch.equal(logits[0], logits[1])
    assert float((logits[0] - logits[2]).abs().max()) > 1e-3


def _one_line_error(capsys, rc, says):
    """The error is one line; the run's ``warning:`` lines (the chat data's, say) may come before it."""
    err = "\n".join(x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("warning: "))
    assert rc == 2 and "\n" not in err and says in err, (rc, err)
    return err


def test_bad_adapter_input_is_one_line(runs, capsys, one_thread):
    import finetune_llama
    from megallama.generation_cli import main as generate_main
    tmp, adapter = runs["tmp"], runs["adapter"]
    lora = runs["lora"] + ["--train-iters", "1"]
    capsys.readouterr()
    cases = [
        (lora + ["--load-adapter", str(tmp / "missing")], f"--load-adapter {tmp / 'missing'} does not exist"),
        (lora + ["--load-adapter", runs["base"]], "has no adapter_config.json, so it is not a LoRA adapter folder"),
        (SMALL + ["--train-iters", "1", "--split", "100,0,0", "--load-adapter", adapter],
         "needs --strategy lora or hybrid"),
        (lora + ["--load-adapter", adapter, "--lora-rank", "8"],
         f"--lora-rank 8 does not match the adapter in --load-adapter {adapter} (r 4"),
        (lora + ["--load-adapter", adapter, "--lora-target-modules", "q_proj"],
         "pass --lora-target-modules q_proj,v_proj,down_proj, or drop"),
    ]
    for argv, says in cases:
        _one_line_error(capsys, finetune_llama.main(argv), says)
    # an adapter of another model shape: a wider base (random weights: nothing is read before the tensors clash)
    wide = [a if a != "32" else "48" for a in SMALL] + ["--strategy", "lora", "--split", "100,0,0",
                                                       "--train-iters", "1", "--load-adapter", adapter]
    err = _one_line_error(capsys, finetune_llama.main(wide), f"--load-adapter {adapter}: adapter tensor")
    assert "has shape" in err, err
    gen = ["--device", "cpu", "--prompt", "x", "--max-new-tokens", "1"]
    _one_line_error(capsys, generate_main(["--load", runs["base"], "--load-adapter", str(tmp / "missing")] + gen),
                    "does not exist")
    _one_line_error(capsys, generate_main(["--load", runs["ft"], "--load-adapter", adapter] + gen),
                    "already holds LoRA adapters")
