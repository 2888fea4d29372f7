"""SFT data and fine-tuning: only assistant tokens count, packing keeps documents apart, the loss is normalised by
the global token count, and finetune_llama.py runs 50 LoRA steps from a pretrain checkpoint on the bundled chats."""
import base64
import json
import os

import pytest
import torch

from dist_utils import rel_err, run_distributed
from megallama.config import ModelConfig
from megallama.data.sft_dataset import (ChatTemplate, GlobalTokenCountIterator, SFTDataset, build_sft_datasets,
                                        read_chat_jsonl, tokenize_conversations)
from megallama.data.tokenizer import build_tokenizer
from megallama.errors import ConfigError
from megallama.model import build_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."}, {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "It is 6."}]


def _answers(tok, tokens, mask):
    return [tok.decode([t for t, m in zip(tokens, mask) if m])]


def test_loss_mask_covers_only_assistant_answers_bundled_tokenizer():
    tok = build_tokenizer("bundled")
    tpl = ChatTemplate(tok)
    assert not tpl.native
    tokens, mask = tpl.encode_dialog(CHAT)
    assert tokens[0] == tok.bos_id and len(tokens) == len(mask)
    # the masked tokens are exactly both answers, each closed by the end-of-turn token
    spans, cur = [], []
    for t, m in zip(tokens, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [s[-1] for s in spans] == [tok.eos_id, tok.eos_id]
    assert [tok.decode(s[:-1]) for s in spans] == ["2 plus 2 is 4.", "It is 6."]
    assert "<|start_header_id|>user<|end_header_id|>" in tok.decode(tokens)


def test_llama3_special_tokens_are_used_when_the_tokenizer_has_them(tmp_path):
    ranks = tmp_path / "tiny.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    tok = build_tokenizer("llama3", str(ranks))
    tpl = ChatTemplate(tok)
    assert tpl.native and tpl.eot == tok.eot_id
    tokens, mask = tpl.encode_dialog(CHAT[1:3])
    sh, eh, eot = (tok.special_tokens[s] for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert tokens[:2] == [tok.bos_id, sh] and tokens.count(eh) == 2 and tokens[-1] == eot
    trained = [t for t, m in zip(tokens, mask) if m]
    assert trained[-1] == eot and tok.decode(trained[:-1]) == "2 plus 2 is 4."
    assert sum(mask) == len(trained) and all(m == 0 for m in mask[:tokens.index(eh, tokens.index(eh) + 1) + 1])


def test_padding_and_packing_samples():
    tok = build_tokenizer("bundled")
    convs = tokenize_conversations([CHAT, CHAT[1:3], CHAT[3:]], ChatTemplate(tok))
    lens = [len(t) for t, _ in convs]
    pad = SFTDataset(convs, 256, tok.pad_id, packing=False)
    assert len(pad) == 3 and "document_ids" not in pad[0]
    got = sorted((int((s["input_ids"] != tok.pad_id).sum()), float(s["loss_mask"].sum())) for s in pad)
    assert got == sorted((n, float(m[1:].sum())) for n, (_, m) in zip(lens, convs))
    packed = SFTDataset(convs, 320, tok.pad_id, packing=True)
    assert len(packed) == 1 and sum(lens) <= 321
    s = packed[0]
    order = [lens.index(int(n)) for n in torch.bincount(s["document_ids"])[:3]]  # the shuffled document order
    starts = (s["position_ids"] == 0).nonzero().flatten().tolist()
    assert starts[:3] == [0, lens[order[0]], lens[order[0]] + lens[order[1]]]
    assert s["document_ids"][starts[1]] == 1 and s["document_ids"][starts[1] - 1] == 0
    assert s["loss_mask"].sum() == sum(int(m[1:].sum()) for _, m in convs)
    for b in starts[1:3]:  # the label crossing into the next document (its bos) is never trained on
        assert s["loss_mask"][b - 1] == 0


def test_packed_documents_do_not_attend_to_each_other():
    """Per-token losses of a packed sample equal those of each conversation run alone."""
    tok = build_tokenizer("bundled")
    convs = tokenize_conversations([CHAT[1:3], CHAT[3:], CHAT], ChatTemplate(tok))
    cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=tok.vocab_size, max_position_embeddings=512, rope_theta=10000.0)
    model = build_model(cfg, seed=1)
    s = SFTDataset(convs, 320, tok.pad_id, packing=True, seed=0)[0]
    convs = [convs[i] for i in SFTDataset(convs, 320, tok.pad_id, packing=True, seed=0).samples[0]]
    with torch.no_grad():
        packed = model(s["input_ids"][None], labels=s["labels"][None], position_ids=s["position_ids"][None],
                       document_ids=s["document_ids"][None])[0]
        at = 0
        for t, _ in convs:
            t = torch.tensor(t)
            alone = model(t[None, :-1], labels=t[None, 1:])[0]
            n = len(t) - 1
            assert rel_err(packed[at:at + n], alone) < 1e-5
            at += len(t)
        leaky = model(s["input_ids"][None], labels=s["labels"][None])[0]  # no document mask: later docs differ
    assert rel_err(leaky[len(convs[0][0]):at - 1], packed[len(convs[0][0]):at - 1]) > 1e-4


def _count_worker(rank, world):
    from megallama.mpu import parallel_state as ps
    ps.initialize_model_parallel(1)
    masks = [torch.ones(2, 4), torch.zeros(2, 4)] if rank == 0 else [torch.ones(2, 4) * 0, torch.tensor([[1.0] * 4,
                                                                                                         [0] * 4])]
    it = GlobalTokenCountIterator(iter([{"loss_mask": m} for m in masks]), 2)
    return [float(next(it)["num_loss_tokens"]) for _ in range(2)]


def test_global_token_count_spans_microbatches_and_dp_ranks():
    out = run_distributed(_count_worker, 2)
    assert out == {0: [12.0, 12.0], 1: [12.0, 12.0]}
    # the loss_func scaling then averages (over 2 microbatches x 2 ranks) to sum / 12, whatever the split
    sums, m, dp = [5.0, 0.0, 0.0, 7.0], 2, 2
    assert abs(sum(s * m * dp / 12 for s in sums) / (m * dp) - 12.0 / 12) < 1e-12


def _sft_losses(rank, world, argv):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    args = parse_args(list(argv), world_size=world)
    args.chat_template = True  # what finetune_llama.py sets: the bundled chats, answer tokens only
    return pretrain(args)["losses"]


SFT_TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "2", "--lr", "1e-2", "--lr-warmup-iters", "0",
            "--no-progress-bar", "--device", "cpu", "--no-fused-kernels", "--split", "100,0,0"]


@pytest.mark.parametrize("world,extra", [
    (2, ["--context-parallel-size", "2"]),
    (4, ["--context-parallel-size", "2", "--cp-comm-type", "a2a", "--sft-packing"]),
    (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"]),
], ids=["cp2_ring", "cp2_dp2_ulysses_packed", "tp2_sp_pp2"])
def test_sft_loss_under_parallel_layouts_matches_single_process(world, extra):
    """The answer-token count is global over data-parallel ranks only: context-parallel ranks share their samples
    (counting over dp x cp made every SFT loss and gradient cp times too small)."""
    base = SFT_TINY + (["--sft-packing"] if "--sft-packing" in extra else [])
    ref = run_distributed(_sft_losses, 1, base)[0]
    out = run_distributed(_sft_losses, world, base + [a for a in extra if a != "--sft-packing"])
    for rank, losses in out.items():
        assert sorted(losses) == sorted(ref) == [1, 2]
        for step in ref:
            assert abs(losses[step] - ref[step]) <= 1e-5 * abs(ref[step]), (rank, step, losses[step], ref[step])


def test_sft_loss_while_the_batch_ramps_up_is_each_iterations_own():
    """Under --rampup-batch-size an iteration of 2 micro-batches was normalised by the answer tokens of the final
    batch's 4 (two of them the next iteration's) and scaled by 4: 10.38 logged where its own mean was 9.08."""
    base = [a for a in SFT_TINY]
    for flag in ("--global-batch-size", "--train-iters", "--lr-warmup-iters"):
        i = base.index(flag)
        del base[i:i + 2]
    base += ["--lr-decay-style", "constant"]
    ramp = run_distributed(_sft_losses, 1, base + ["--global-batch-size", "8", "--rampup-batch-size", "4", "4", "8",
                                                   "--train-samples", "8"])[0]
    ref = run_distributed(_sft_losses, 1, base + ["--global-batch-size", "4", "--train-iters", "2"])[0]
    assert sorted(ramp) == sorted(ref) == [1, 2]
    for step in ref:
        assert abs(ramp[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, ramp, ref)


def test_bad_chat_data_is_one_line_error(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}))
    with pytest.raises(ConfigError, match="line 2"):
        read_chat_jsonl(str(p))
    p.write_text('{"messages": [}\n')
    with pytest.raises(ConfigError, match="line 1 is not valid JSON"):
        read_chat_jsonl(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        build_sft_datasets(str(tmp_path / "none.jsonl"), build_tokenizer("bundled"), 64)


# ------------------------------------------------------------------ end to end: pretrain -> finetune (LoRA)
SMALL = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--micro-batch-size", "2", "--global-batch-size",
         "2", "--no-fused-kernels", "--no-progress-bar", "--device", "cpu", "--log-interval", "10", "--seed", "3", "--vocab-size", "8192"]


def test_finetune_50_lora_steps_from_pretrain_checkpoint(tmp_path, capsys, one_thread):
    import finetune_llama
    from megallama.arguments import parse_args
    from megallama.strategies import load_adapter
    from megallama.training import pretrain
    ck = str(tmp_path / "pre")
    # a "pretrained" base whose frozen embeddings/head are large enough for adapters to move the logits
    pretrain(parse_args(SMALL + ["--mock-data", "--seq-length", "96", "--train-iters", "1", "--save", ck,
                                 "--save-interval", "1", "--init-method-std", "0.2"], world_size=1))
    adapter = str(tmp_path / "adapter")
    args = finetune_llama.prepare_finetune_args(parse_args(
        SMALL + ["--seq-length", "96", "--train-iters", "50", "--lr", "3e-2", "--lr-warmup-iters", "2",
                 "--pretrained-checkpoint", ck, "--strategy", "lora", "--lora-rank", "8", "--lora-target-modules",
                 "all", "--save-adapter", adapter, "--sft-packing", "--split", "100,0,0"], world_size=1))
    out = pretrain(args)
    losses = [out["losses"][i] for i in sorted(out["losses"])]
    assert len(losses) == 50
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.5, (first, last)
    log = capsys.readouterr().out
    assert "strategy lora" in log and "loaded weights" in log
    # the adapters reload into a fresh LoRA model of the pretrained weights
    from megallama.checkpointing import load_checkpoint
    from megallama.strategies import TrainingStrategy, apply_strategy
    m = build_model(args.model_config, seed=3)
    load_checkpoint(ck, [m], None, args, finetune=True)
    apply_strategy([m], TrainingStrategy("lora", {"lora_rank": 8, "target_modules": "all"}))
    assert load_adapter(adapter, [m]) == 2 * 7 * 2
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))


def test_resumed_finetune_does_not_reload_the_pretrained_weights(tmp_path, capsys, one_thread):
    """--load X --save X of a LoRA fine-tune that has saved: the run's checkpoint has every weight, so the
    pretrained checkpoint is not read again (minutes on a 70B); the resumed steps equal the uninterrupted run's."""
    import finetune_llama
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    ck = str(tmp_path / "pre")
    pretrain(parse_args(SMALL + ["--mock-data", "--seq-length", "64", "--train-iters", "1", "--save", ck],
                        world_size=1))
    run = SMALL + ["--seq-length", "64", "--lr", "1e-2", "--pretrained-checkpoint", ck, "--strategy", "lora",
                   "--lora-rank", "4", "--split", "100,0,0", "--save", str(tmp_path / "sft"), "--load",
                   str(tmp_path / "sft"), "--save-interval", "2"]

    def finetune(*extra):
        capsys.readouterr()
        out = pretrain(finetune_llama.prepare_finetune_args(parse_args(run + ["--train-iters", "4", *extra],
                                                                       world_size=1)))
        return out["losses"], capsys.readouterr().out

    full, _ = finetune()
    import shutil
    shutil.rmtree(tmp_path / "sft")
    first, log = finetune("--exit-interval", "2")
    assert f"loaded weights from {ck}" in log
    rest, log = finetune()
    assert "resumed from" in log and f"loaded weights from {ck}" not in log, log
    assert {**first, **rest} == full

    # the base deleted or moved since the start: the resume needs nothing of it (it was refused as missing)
    shutil.rmtree(tmp_path / "sft" / "iter_0000004")
    (tmp_path / "sft" / "latest_checkpointed_iteration.txt").write_text("2")
    os.rename(ck, str(tmp_path / "moved"))
    adapter = str(tmp_path / "adapter")
    rest, log = finetune("--save-adapter", adapter)
    assert f"--pretrained-checkpoint {ck} is not there; not needed to resume" in log, log
    assert {**first, **rest} == full
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == ck  # still the base the adapters were trained on
