"""Tiny Llama-architecture model for tests and the demo: random weights, locally trained tokenizer.

Nothing is downloaded. The corpus is generated from a seeded syllable grammar, a byte-level BPE tokenizer is
trained on it, and a 2-layer Llama with seeded random weights is saved in Hugging Face format. vLLM loads the
folder like any other model. Must not import Ray or vLLM (it runs before either starts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Bumped whenever the generated files change, so caches built by older code are rebuilt.
FORMAT_VERSION = 1

_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the generated model. Defaults follow the CPU recipe (`shared/reference/cpu-stack.md`)."""

    vocab_size: int = 4096  # >= 1,000 so prompts of thousands of tokens are cheap to build
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0
    corpus_sentences: int = 20_000

    def __post_init__(self) -> None:
        if self.vocab_size < 1000:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be >= 1000 so long prompts are easy to build")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )

    def fingerprint(self) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_dir() -> Path:
    """`$HETEROSCALE_CACHE` or `~/.cache/heteroscale`: where generated models live."""
    return Path(os.environ.get("HETEROSCALE_CACHE", Path.home() / ".cache" / "heteroscale"))


def generate_corpus(num_sentences: int, seed: int) -> list[str]:
    """Deterministic pseudo-English: words from a syllable grammar with a Zipf-like word frequency."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
              "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng"]
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < 6000:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(rng.choice([1, 1, 2, 2, 3])))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(lexicon))]
    sentences = []
    for _ in range(num_sentences):
        words = rng.choices(lexicon, weights=weights, k=rng.randint(5, 18))
        sentence = " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])
        if rng.random() < 0.1:
            sentence += f" {rng.randint(0, 9999)}"
        sentences.append(sentence)
    return sentences


def _train_tokenizer(spec: TinyModelSpec, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(generate_corpus(spec.corpus_sentences, spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def _write_model(spec: TinyModelSpec, out_dir: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    # Wider-than-default init so greedy argmax is decisive (few near-ties between token logits).
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
    model.to(torch.bfloat16).save_pretrained(str(out_dir), safe_serialization=True)


def ensure_tiny_model(cache_dir: Path | None = None, spec: TinyModelSpec | None = None) -> Path:
    """Return the folder of the tiny model, generating it (about 10 s) if it is missing or out of date."""
    spec = spec or TinyModelSpec()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out_dir = root / "models" / f"tiny-llama-{spec.fingerprint()}"
    marker = out_dir / ".complete"
    if marker.exists():
        return out_dir
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    logger.info("generating tiny model into %s", out_dir)
    _train_tokenizer(spec, tmp_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_dir))
    _write_model(spec, tmp_dir, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    (tmp_dir / ".complete").write_text(json.dumps(asdict(spec)))
    if out_dir.exists():  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
    else:
        tmp_dir.rename(out_dir)
    return out_dir


def make_prompt(tokenizer, num_tokens: int, seed: int = 0) -> str:
    """Build text that the tokenizer encodes to exactly `num_tokens` tokens (no special tokens)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens ({num_tokens}) must be >= 1")
    corpus = generate_corpus(max(8, num_tokens // 4), seed + 1)
    ids: list[int] = []
    for sentence in corpus:
        ids.extend(tokenizer.encode(" " + sentence, add_special_tokens=False))
        if len(ids) >= num_tokens + 8:
            break
    ids = ids[:num_tokens]
    # Decoding then re-encoding can merge across the cut; trim until the round trip is exact.
    for _ in range(64):
        text = tokenizer.decode(ids)
        again = tokenizer.encode(text, add_special_tokens=False)
        if len(again) == num_tokens:
            return text
        ids = again[:num_tokens] if len(again) > num_tokens else again + ids[len(again):num_tokens]
    raise RuntimeError(f"could not build a prompt of exactly {num_tokens} tokens")
