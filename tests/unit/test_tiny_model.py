import json

import pytest

from heteroscale_ray.tiny_model import TinyModelSpec, ensure_tiny_model, generate_corpus, make_prompt


def test_corpus_is_seeded():
    assert generate_corpus(50, 3) == generate_corpus(50, 3)
    assert generate_corpus(50, 3) != generate_corpus(50, 4)


def test_spec_validation_names_the_value():
    with pytest.raises(ValueError, match=r"vocab_size \(500\)"):
        TinyModelSpec(vocab_size=500)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\).*num_key_value_heads \(3\)"):
        TinyModelSpec(num_key_value_heads=3)


@pytest.fixture(scope="module")
def model_dir():
    return ensure_tiny_model()


def test_model_folder_is_a_hugging_face_llama(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] >= 1000
    assert (model_dir / "tokenizer.json").exists() and list(model_dir.glob("*.safetensors"))
    assert ensure_tiny_model() == model_dir  # reused, not regenerated


def test_generation_is_deterministic(tmp_path):
    spec = TinyModelSpec(vocab_size=1024, hidden_size=64, intermediate_size=128, corpus_sentences=500)
    a = ensure_tiny_model(tmp_path / "a", spec)
    b = ensure_tiny_model(tmp_path / "b", spec)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.mark.parametrize("n", [1, 20, 1500, 3000])
def test_prompts_have_exact_token_counts(model_dir, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tok.encode(make_prompt(tok, n), add_special_tokens=False)) == n


def test_chat_template_present(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n") and "<|user|>\nhi" in text
