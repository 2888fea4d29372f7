"""A user audit of generation on a tiny pretraining run and a LoRA chat fine-tune of it: a chat prompt may be an
HF-style conversation (system turn included, in Llama 3's and Llama 2's formats) and ``--system-prompt`` sets one;
``--chat`` on a pretraining run warns that the template is a guess; no prompts and a too-long prompt say what is
wrong and what fits; ``--greedy`` with sampling flags is refused in one line."""
import pytest

from megallama.errors import ConfigError

SMALL = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--micro-batch-size", "2", "--global-batch-size",
         "2", "--no-fused-kernels", "--no-progress-bar", "--device", "cpu", "--log-interval", "1", "--seed", "3",
         "--seq-length", "64"]
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Name a color."}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step pretraining run (no chat format) and a 1-step LoRA SFT of it in Llama 2's chat format."""
    from loop_harness import pretrain_here
    tmp = tmp_path_factory.mktemp("audit")
    base, sft = str(tmp / "base"), str(tmp / "sft")
    pretrain_here(SMALL + ["--train-iters", "2", "--save", base, "--data-cache-dir", str(tmp / "cache")])
    pretrain_here(SMALL + ["--pretrained-checkpoint", base, "--strategy", "lora", "--split", "100,0,0",
                           "--chat-template", "llama2", "--train-iters", "1", "--save", sft, "--data-cache-dir",
                           str(tmp / "cache")], finetune=True)
    return {"base": base, "sft": sft}


@pytest.fixture
def base_model(runs, one_thread):
    from megallama.generation_cli import load_for_generation
    from megallama.mpu import parallel_state as ps
    yield load_for_generation(runs["base"], device="cpu")
    ps.destroy_model_parallel()


def _main(argv, capsys):
    from megallama.generation_cli import main
    capsys.readouterr()
    rc = main(argv + ["--device", "cpu"])
    return rc, capsys.readouterr()


def test_a_chat_prompt_may_be_a_conversation_with_a_system_turn(runs, base_model, capsys):
    """``generate_text(loaded, [[{"role": "user", ...}]], cfg, chat=True)`` raised AttributeError ('list' object
    has no attribute 'strip')."""
    from megallama.data.chat_templates import build_chat_template
    from megallama.generation import SamplingConfig
    from megallama.generation_cli import generate_text
    loaded, tok = base_model, base_model.tokenizer
    cfg = SamplingConfig(max_new_tokens=4, temperature=0)
    # one user turn as a conversation is the str prompt
    assert generate_text(loaded, [[USER]], cfg, chat=True) == generate_text(loaded, [USER["content"]], cfg, chat=True)
    from megallama.generation_cli import encode_prompts  # the ids generate_text decodes from
    # the system turn, as each template writes it: Llama 3 a turn of its own, Llama 2 folded into the first user turn
    # (the bundled tokenizer: Llama 3's markers as text, end of turn its eos, which decodes to nothing)
    for name, text in [("llama3", "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                                  "<|start_header_id|>user<|end_header_id|>\n\nName a color."),
                       ("llama2", "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a color. [/INST]")]:
        tpl = build_chat_template(name, tok)
        ids, stop = encode_prompts(loaded, [[SYSTEM, USER]], chat=True, chat_template=name)
        assert ids == [tpl.encode_dialog([SYSTEM, USER], add_generation_prompt=True)[0]]
        words = " ".join(tok.decode(ids[0]).split())
        assert " ".join(text.replace("<|eot_id|>", " ").split()) in words and tpl.eot in stop, (name, words)
        assert len(generate_text(loaded, [[SYSTEM, USER]], cfg, chat=True, chat_template=name)) == 1
    # malformed prompts: one ConfigError line each
    for prompts, chat, says in [([USER], True, "chat prompt 1 is a dict"),
                                ([[{"role": "user"}]], True, "not a {'role', 'content'} dict"),
                                (["ok", []], True, "chat prompt 2 is an empty list"),
                                ([[USER]], False, "a list of messages is a chat prompt: pass chat=True")]:
        with pytest.raises(ConfigError, match=says) as e:
            generate_text(loaded, prompts, cfg, chat=chat)
        assert "\n" not in str(e.value)
    # --system-prompt: the same as the conversation through the API; refused without --chat
    want = generate_text(loaded, [[SYSTEM, USER]], cfg, chat=True)[0]
    rc, out = _main(["--load", runs["base"], "--chat", "--system-prompt", SYSTEM["content"], "--prompt",
                     USER["content"], "--greedy", "--max-new-tokens", "4"], capsys)
    assert rc == 0 and out.out.endswith(f"--- prompt: {USER['content']}\n{want}\n"), out
    rc, out = _main(["--load", runs["base"], "--system-prompt", "Be brief.", "--prompt", "hi"], capsys)
    assert rc == 2 and out.err == "error: --system-prompt is a chat turn; add --chat, or drop --system-prompt\n"


def test_chat_on_a_pretraining_run_warns_that_the_template_is_a_guess(runs, capsys, one_thread):
    argv = ["--chat", "--prompt", "hi", "--max-new-tokens", "2"]
    rc, out = _main(["--load", runs["base"]] + argv, capsys)
    warnings = [line for line in out.out.splitlines() if line.startswith("warning:")]
    assert rc == 0 and "chat template: llama3" in out.out and len(warnings) == 1, out
    assert "not trained on a chat format" in warnings[0] and "--chat-template" in warnings[0], warnings
    for load in (["--load", runs["base"], "--chat-template", "llama3"], ["--load", runs["sft"]]):  # picked; trained
        rc, out = _main(load + argv, capsys)
        assert rc == 0 and "not trained on a chat format" not in out.out, out
    assert "chat template: llama2" in out.out, out.out  # the fine-tune's recorded format


def test_no_prompts_and_too_long_prompts_say_what_fits(base_model):
    from megallama.generation import SamplingConfig, generate
    from megallama.generation_cli import generate_text
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)
    with pytest.raises(ConfigError, match="^no prompts given"):
        generate_text(base_model, [], cfg)
    with pytest.raises(ConfigError, match="^no prompts given"):
        generate(base_model.model, [], cfg)
    context = base_model.model.config.max_position_embeddings
    with pytest.raises(ConfigError) as e:  # the audit's case: a prompt as long as the context
        generate(base_model.model, [[5] * context], cfg)
    msg = str(e.value)
    assert f"shorten the prompt to fewer than {context - 7} tokens, or lower --max-new-tokens" in msg, msg
    assert f"prompt tokens + --max-new-tokens must be <= {context}" in msg, msg
    with pytest.raises(ConfigError, match=f"must be <= {context}"):
        generate(base_model.model, [[5] * (context - 7)], cfg)
    assert len(generate(base_model.model, [[5] * (context - 8)], cfg)[0]) == 8  # what the message says fits


def test_greedy_with_sampling_flags_is_refused_in_one_line(capsys):
    """They were ignored without a word (no README or test passes them together)."""
    rc, out = _main(["--load", "no-such-checkpoint", "--prompt", "hi", "--greedy", "--temperature", "0.7",
                     "--top-k", "5"], capsys)
    assert rc == 2 and out.err == ("error: --greedy takes the most likely token, so --temperature, --top-k would be "
                                   "ignored; drop --greedy to sample, or drop --temperature and --top-k\n"), out.err
    rc, out = _main(["--load", "no-such-checkpoint", "--prompt", "hi", "--greedy", "--top-p", "0.9"], capsys)
    assert rc == 2 and "--top-p would be ignored" in out.err, out.err
    # the values that leave greedy as it is pass the check (and reach the load)
    rc, out = _main(["--load", "no-such-checkpoint", "--prompt", "hi", "--greedy", "--temperature", "0", "--top-k",
                     "0", "--top-p", "1"], capsys)
    assert rc == 2 and "does not exist" in out.err, out.err
