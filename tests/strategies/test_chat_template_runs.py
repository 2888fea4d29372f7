"""A run fine-tuned with ``--chat-template llama2`` records it: ``generate --chat`` prompts in Llama 2's format and
stops at </s>, the HF export writes a Llama 2 template that transformers renders to the trained ids, and a resume
keeps the run's format (another one is refused in one line; a fine-tune from the run takes it, or warns)."""
import json
import os
import sys

import pytest

from megallama.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANSWER = "2 plus 2 is 4."
QUESTION = "What is 2 plus 2?"
TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--device", "cpu", "--no-progress-bar",
        "--no-fused-kernels", "--split", "100,0,0", "--seq-length", "48", "--micro-batch-size", "4",
        "--global-batch-size", "4", "--lr", "1e-2", "--lr-decay-style", "constant"]


def _args(tmp, *flags):
    import finetune_llama
    from megallama.arguments import parse_args
    return finetune_llama.prepare_finetune_args(parse_args(TINY + ["--data-path", str(tmp / "c.jsonl"), *flags],
                                                           world_size=1))


@pytest.fixture(scope="module")
def llama2_run(tmp_path_factory):
    """One conversation learnt by heart in Llama 2's format (the bundled tokenizer: auto would pick llama3)."""
    from megallama.mpu import parallel_state as ps
    from megallama.training import pretrain
    tmp = tmp_path_factory.mktemp("l2")
    rows = [{"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]}] * 8
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = str(tmp / "sft")
    pretrain(_args(tmp, "--chat-template", "llama2", "--train-iters", "80", "--save", run, "--save-interval", "80",
                   "--log-interval", "20"))
    ps.destroy_model_parallel()
    return tmp, run


def test_the_run_records_its_template_and_generate_chat_uses_it(llama2_run, capsys, one_thread):
    import megallama
    from megallama.checkpointing.full import saved_args
    from megallama.data.chat_templates import Llama2ChatTemplate
    from megallama.generation import SamplingConfig, generate
    from megallama.generation_cli import chat_template_of, main
    from megallama.mpu import parallel_state as ps
    tmp, run = llama2_run
    assert saved_args(run)["chat_format"] == "llama2"
    loaded = megallama.load_for_generation(run, device="cpu")
    tpl = chat_template_of(loaded)
    assert isinstance(tpl, Llama2ChatTemplate)
    tok = loaded.tokenizer
    prompt = tpl.encode_dialog([{"role": "user", "content": QUESTION}], add_generation_prompt=True)[0]
    assert prompt == [tok.bos_id] + tok.encode(f"[INST] {QUESTION} [/INST]")  # Llama 2's prompt
    free = generate(loaded.model, [prompt], SamplingConfig(max_new_tokens=14, temperature=0.0))[0]
    n = len(tok.encode(f"[INST] {QUESTION} [/INST] {ANSWER} ")) + 1 - len(prompt)
    assert tok.decode(free[:n]).strip() == ANSWER and free[n] == tok.eos_id  # the answer, then </s>
    cfg = SamplingConfig(max_new_tokens=14, temperature=0.0)
    out = megallama.generate_text(loaded, [QUESTION], cfg, chat=True)
    assert [o.strip() for o in out] == [ANSWER] and len(tok.encode(out[0])) < 14  # stopped at </s>
    ps.destroy_model_parallel()
    capsys.readouterr()
    assert main(["--load", run, "--chat", "--prompt", QUESTION, "--greedy", "--device", "cpu",
                 "--max-new-tokens", "14"]) == 0
    printed = capsys.readouterr().out
    assert "chat template: llama2" in printed and printed.rstrip().endswith(ANSWER), printed
    ps.destroy_model_parallel()


def test_export_writes_the_llama2_template_that_renders_the_trained_ids(llama2_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint as conv
    from megallama.checkpointing.full import saved_args
    from megallama.data.chat_templates import Llama2ChatTemplate
    from megallama.data.tokenizer_export import run_tokenizer
    _, run = llama2_run
    notes = []
    conv.megallama_to_hf(run, str(tmp_path / "hf"), notes=notes)
    assert any(n.startswith("chat_template: Llama 2's, as the run trained on") and "warning" not in n
               for n in notes), notes
    assert "[INST]" in json.load(open(tmp_path / "hf" / "tokenizer_config.json"))["chat_template"]
    ours = Llama2ChatTemplate(run_tokenizer(saved_args(run)))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER},
             {"role": "user", "content": "  And 3 plus 3?\n"}]
    for messages in ([system] + turns, turns, turns[:1], [system] + turns[:2]):
        got = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(got) == ours.encode_dialog(messages)[0], messages


def test_resume_keeps_the_runs_template(llama2_run, capsys):
    tmp, run = llama2_run
    assert _args(tmp, "--load", run, "--save", run).chat_format == "llama2"  # auto: the run's
    with pytest.raises(ConfigError, match=r"--chat-template llama3, but the run in --load .* trained with llama2; "
                                          r"drop --chat-template") as e:
        _args(tmp, "--load", run, "--save", run, "--chat-template", "llama3")
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert _args(tmp, "--pretrained-checkpoint", run, "--save", str(tmp / "next")).chat_format == "llama2"
    assert "chat template: llama2, as" in capsys.readouterr().out
    assert _args(tmp, "--pretrained-checkpoint", run, "--save", str(tmp / "next"),
                 "--chat-template", "llama3").chat_format == "llama3"
    out = capsys.readouterr().out
    assert "warning: --chat-template llama3, but" in out and "chat-trained with llama2" in out
