"""A user mistake that only some ranks make (one pipeline stage's modules, one rank's files) is printed by rank 0
only when rank 0 makes it too; under torchrun the failing rank's one line reaches torchrun's failure summary
(TORCHELASTIC_ERROR_FILE, what ``@record`` does), so the job does not end with nothing said."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_error_on_rank_1_alone_is_named_in_torchruns_summary(tmp_path):
    script = tmp_path / "one_rank.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from megallama.errors import ConfigError
        from megallama.initialize import run_script

        def body():
            if os.environ.get("RANK") == "1":
                raise ConfigError("stage 1 has no decoder layer; give every stage one")

        sys.exit(run_script(body))
        """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "rank      : 1" in out and "ConfigError: stage 1 has no decoder layer; give every stage one" in out, out
    assert "error: stage 1" not in out  # rank 0 made no mistake: no line of its own
    # the summary's traceback field is the one line, not the rank's Python stack (torchrun's own stack stays)
    assert "traceback : ConfigError: stage 1 has no decoder layer" in out and "run_script" not in out, out
