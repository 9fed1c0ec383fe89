"""``bpsim record`` end to end on tiny local models: the trace, the summary, overwrite refusal, Ctrl-C and recovery."""

import json

import pytest
import torch

from bpsim.cli import main
from bpsim.decoding import SpeculativeDecoder
from bpsim.traces import TraceWriter, parts_dir, read_trace, trace_metadata
from test_traces import METADATA, make_rounds


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, real_pair):
    """Two random two-layer Llama folders sharing the built-in target's tokenizer: (target, draft)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = real_pair.tokenizer
    folders = []
    for seed, name in ((0, "tiny-target"), (1, "tiny-draft")):
        folder = tmp_path_factory.mktemp(name)
        config = LlamaConfig(vocab_size=real_pair.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p/{i}", "prompt": text} for i, text in enumerate(["Name a color.", "Count to three.", "Say hi."])]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def record_args(models, prompts_file, out, *extra):
    target, draft = models
    return ["record", "--suite", str(prompts_file), "--target", target, "--draft", draft, "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", "6", "--out", str(out), *extra]


def test_record_writes_trace(tiny_models, prompts_file, tmp_path, capsys):
    out = tmp_path / "trace.parquet"
    assert main(record_args(tiny_models, prompts_file, out, "--draft-len", "2", "--limit", "2")) == 0
    table = read_trace(out)
    metadata = trace_metadata(table)
    assert set(table.column("prompt_id").to_pylist()) == {"p/0", "p/1"}
    assert set(table.column("draft_len").to_pylist()) == {2}
    assert metadata["policy"] == {"kind": "speculative", "draft_len": 2}
    assert metadata["complete"] is True
    assert metadata["sampling"]["mode"] == "greedy"
    assert metadata["draft"]["name"] == tiny_models[1]
    assert sorted(metadata["prompt_tokens"]) == ["p/0", "p/1"]
    assert metadata["libraries"]["torch"] == torch.__version__
    output = capsys.readouterr().out
    assert f"wrote {out}" in output
    assert "requests 2, rounds" in output


def test_record_target_only(tiny_models, prompts_file, tmp_path):
    out = tmp_path / "target-only.parquet"
    assert main(record_args(tiny_models, prompts_file, out, "--target-only", "--limit", "1",
                            "--temperature", "0.8", "--top-k", "20", "--seed", "3")) == 0
    table = read_trace(out)
    metadata = trace_metadata(table)
    assert set(table.column("draft_len").to_pylist()) == {0}
    assert metadata["policy"] == {"kind": "target-only", "draft_len": 0}
    assert metadata["draft"] is None
    assert metadata["sampling"] == {"temperature": 0.8, "top_k": 20, "top_p": 1.0, "seed": 3, "mode": "sample"}


def test_record_refuses_overwrite(tiny_models, prompts_file, tmp_path, capsys):
    out = tmp_path / "trace.parquet"
    out.write_bytes(b"an earlier trace")
    assert main(record_args(tiny_models, prompts_file, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier trace"


def test_record_rejects_bad_setting(tiny_models, prompts_file, tmp_path, capsys):
    assert main(record_args(tiny_models, prompts_file, tmp_path / "x.parquet", "--top-p", "0")) == 2
    assert "top_p must lie in (0, 1]" in capsys.readouterr().err


def test_record_keeps_requests_on_ctrl_c(tiny_models, prompts_file, tmp_path, capsys, monkeypatch):
    generate = SpeculativeDecoder.generate
    calls = []

    def interrupt_second(self, input_ids, generator=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(self, input_ids, generator)

    monkeypatch.setattr(SpeculativeDecoder, "generate", interrupt_second)
    out = tmp_path / "interrupted.parquet"
    assert main(record_args(tiny_models, prompts_file, out, "--draft-len", "1")) == 130
    table = read_trace(out)
    assert set(table.column("request_id").to_pylist()) == {0}
    assert trace_metadata(table)["complete"] is False
    assert f"kept the 1 finished requests of 3 in {out}" in capsys.readouterr().err
    assert not parts_dir(out).exists()


def test_record_recovers_parts(tmp_path, capsys):
    out = tmp_path / "killed.parquet"
    writer = TraceWriter(out, METADATA)
    writer.add_request(0, "p/0", make_rounds([1, 2]))
    assert main(["record", "--recover", "--out", str(out)]) == 0
    assert read_trace(out).num_rows == 2
    assert f"into {out}" in capsys.readouterr().out


def test_record_predraft_times_the_overlap(tiny_models, prompts_file, tmp_path):
    out = tmp_path / "predraft.parquet"
    assert main(record_args(tiny_models, prompts_file, out, "--draft-len", "2", "--limit", "1", "--predraft")) == 0
    table = read_trace(out)
    metadata = trace_metadata(table)
    assert metadata["policy"]["kind"] == "predraft"
    assert metadata["policy"]["predictor"]["params"]["choice"] == "all"
    finished = table.column("finished").to_pylist()
    predraft_ms = table.column("predraft_ms").to_pylist()
    assert all(ms is not None and ms >= 0 for ms, last in zip(predraft_ms, finished) if not last)


def test_record_predraft_needs_drafts(tiny_models, prompts_file, tmp_path, capsys):
    out = tmp_path / "predraft.parquet"
    assert main(record_args(tiny_models, prompts_file, out, "--target-only", "--predraft")) == 2
    assert "--predraft needs drafts" in capsys.readouterr().err
    assert not out.exists()
