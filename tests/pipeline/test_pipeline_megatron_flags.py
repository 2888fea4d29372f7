"""Megatron's pipeline flags as a launch line gives them: --pipeline-model-parallel-layout becomes megallama's
split (or one error line), the other flags are accepted or refused, and a split that cannot be built is refused
while parsing, before any data is read or model built."""
import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.pipeline.layout import parse_layout
from megallama.pipeline.model_chunks import model_parts

BASE = ["--model", "tiny_llama3_50m", "--num-layers", "6", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--train-iters", "1", "--device", "cpu"]


def parse(pp, *extra):
    return parse_args(BASE + ["--pipeline-model-parallel-size", str(pp), *extra], world_size=pp)


def sizes(args):
    parts = model_parts(args.model_config, args.pipeline_model_parallel_size, args.pipeline_schedule,
                        layer_counts=args.pipeline_layer_counts)
    return [len(p) for p in parts]


def test_parse_layout_follows_megatron_grammar():
    assert parse_layout("Et*3|(tt|)*29,ttL", 31, 63) == [3] + [2] * 30
    assert parse_layout("Ett|(tt|)*2,ttL", 4, 8) == [2, 2, 2, 2]
    assert parse_layout("Et*3|t*3L", 2, 6) == [3, 3]
    for bad, msg in (("Et|tmL", "MTP"), ("Et|tt|tL", "not a multiple"), ("tE|tttL", "start with the embedding"),
                     ("Et|tx|ttL|t", "unknown layer character"), ("Ett|tt", "end with the loss"),
                     ("Ett|tt|L|", "the last stage is empty"), ("Ett|tL", "places 3 decoder layers")):
        with pytest.raises(ConfigError, match=msg):
            parse_layout(bad, 2, 4)


def test_layout_becomes_megallamas_split():
    a = parse(2, "--pipeline-model-parallel-layout", "Et*4|ttL")
    assert a.pipeline_schedule == "1f1b" and sizes(a) == [4, 2]
    a = parse(3, "--pipeline-model-parallel-layout", "Et|tttt|tL", "--pipeline-schedule", "zb-h1")
    assert a.pipeline_schedule == "zb-h1" and sizes(a) == [1, 4, 1]
    a = parse(2, "--pipeline-model-parallel-layout", "Ett|t*4L", "--pipeline-schedule", "chimera")
    assert a.pipeline_schedule == "chimera" and sizes(a) == [2, 4]
    a = parse(3, "--pipeline-model-parallel-layout", "E(t|)*5tL")  # 2 virtual stages of 1 layer per rank
    assert (a.pipeline_schedule, a.virtual_pipeline_model_parallel_size) == ("interleaved", 2)
    assert sizes(a) == [1] * 6


@pytest.mark.parametrize("extra, msg", [
    (["--pipeline-model-parallel-layout", "E(t|)*5tL", "--pipeline-schedule", "gpipe"], "only --pipeline-schedule"),
    (["--pipeline-model-parallel-layout", "Ettt|tttL", "--pipeline-schedule", "interleaved"], "one stage per rank"),
    (["--pipeline-model-parallel-layout", "Ettt|tttL", "--decoder-first-pipeline-num-layers", "3"], "both place"),
    (["--pipeline-model-parallel-layout", "Ettt|tttL", "--account-for-loss-in-pipeline-split"], "both place"),
    (["--pipeline-model-parallel-layout", "Et|t|t|tttL", "--num-virtual-stages-per-pipeline-rank", "2"],
     "both place"),
])
def test_layout_refusals(extra, msg):
    with pytest.raises(ConfigError, match=msg):
        parse(2, *extra)


def test_layout_is_built_as_given():
    """Any counts per stage (this one was refused: the partitioner rebalanced the middle stages by cost)."""
    assert sizes(parse(4, "--pipeline-model-parallel-layout", "Et|ttt|t|tL")) == [1, 3, 1, 1]
    assert sizes(parse(4, "--pipeline-model-parallel-layout", "Et|tt|tt|tL")) == [1, 2, 2, 1]


def test_layout_on_one_stage():
    assert parse(1, "--pipeline-model-parallel-layout", "Et*6L").pipeline_schedule == "1f1b"
    with pytest.raises(ConfigError, match="has 2 stages but --pipeline-model-parallel-size is 1"):
        parse(1, "--pipeline-model-parallel-layout", "Ettt|tttL")


@pytest.mark.parametrize("extra, msg", [
    (["--microbatch-group-size-per-virtual-pipeline-stage", "4"], "of the interleaved schedule, not '1f1b'"),
    (["--microbatch-group-size-per-virtual-pipeline-stage", "1", "--num-layers-per-virtual-pipeline-stage", "1"],
     r"should range in \[PP=2, "),
    (["--defer-embedding-wgrad-compute"], "zb-h1"),
    (["--wgrad-deferral-limit", "2"], "drop it"),
    (["--variable-seq-lengths"], "padded to --seq-length"),
    (["--pipeline-model-parallel-comm-backend", "ucc"], "pass nccl"),
])
def test_refused_flags_are_one_line(extra, msg):
    with pytest.raises(ConfigError, match=msg):
        parse(2, *extra)


def test_accepted_flags():
    a = parse(2, "--microbatch-group-size-per-virtual-pipeline-stage", "2", "--overlap-p2p-communication-warmup-flush",
              "--no-align-param-gather", "--pipeline-model-parallel-comm-backend", "nccl")
    assert a.align_param_gather is False and a.overlap_p2p_comm_warmup_flush
    a = parse(2, "--microbatch-group-size-per-virtual-pipeline-stage", "4", "--num-layers-per-virtual-pipeline-stage",
              "1", "--deallocate-pipeline-outputs")  # groups of 4 (the schedule checks them against the batch)
    assert (a.pipeline_schedule, a.microbatch_group_size_per_vp_stage) == ("interleaved", 4)
    assert a.deallocate_pipeline_outputs  # what the runner always does
    assert parse(1, "--variable-seq-lengths").variable_seq_lengths


@pytest.mark.parametrize("pp, extra, msg", [
    (8, [], "cannot split 6 layers over 8 pipeline stages"),
    (2, ["--decoder-first-pipeline-num-layers", "6"], "leave 0 layers for 1 other stages"),
    (3, ["--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "3"], "leave 0 layers"),
    (2, ["--decoder-first-pipeline-num-layers", "0"], "must be >= 1"),
    # were split by cost ([2, 2, 1] for 6 layers, first 1): Megatron asserts the rest divides over the other ranks
    (3, ["--decoder-first-pipeline-num-layers", "1"], "leave 5 layers for 2 other stages, which must split evenly"),
    # was silently ignored at pp 1
    (1, ["--decoder-last-pipeline-num-layers", "2"], "needs --pipeline-model-parallel-size > 1"),
    # was silently dropped, then refused: Megatron takes the pins with --num-virtual-stages-per-pipeline-rank only
    (3, ["--num-layers-per-virtual-pipeline-stage", "1", "--decoder-first-pipeline-num-layers", "1"],
     "pass the chunks per rank as --num-virtual-stages-per-pipeline-rank"),
])
def test_bad_splits_are_refused_while_parsing(pp, extra, msg):
    with pytest.raises(ConfigError, match=msg):
        parse(pp, *extra)
