"""A tiny deterministic random Qwen3 saved as an HF folder, with the REAL Qwen tokenizer.

The tokenizer is rebuilt from llama.cpp's `ggml-vocab-qwen2.gguf` (151,643 byte-level BPE tokens and
its merges) plus the added tokens of the published compiler, laid out as in the model card of programasweights/paw-4b-gpt2 and the official SDK:

- ids 151643..151668: Qwen3's own 26 added tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
  …, `<think>`, `</think>`), special or not exactly as Qwen3 marks them;
- ids 151669..151732: the 64 `<prefix_1>`..`<prefix_64>` added special tokens, i.e. right after the
  vocabulary's own tokens, the same ids as the trained compiler;
- the embedding has 151,733 rows, one per token (the trained compiler's size).

The model is small but shaped to exercise what the converter must get right: head_dim (128) differs
from hidden / heads (256 / 4 = 64), grouped-query attention (4 q heads, 2 kv heads), every matrix
row a multiple of 256 so the K-quants apply to all of them, non-trivial norm weights, bf16 weights
split over several safetensors shards with an index (as the published checkpoint is), the
transformers-5 `rope_parameters` block, and a Qwen-style chat template either in
`chat_template.jinja` (as transformers 5 writes it) or inside `tokenizer_config.json`.

Used by the converter tests and by the compiler tests (`make_tiny_qwen3`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_BASE_TOKENS = 151643  # the Qwen2/Qwen3 byte-level BPE vocabulary, ids 0..151642
# Qwen3's added tokens in id order from 151643; the bool is the tokenizer's `special` flag.
QWEN3_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
N_PREFIX = 64
PREFIX_TOKENS = [f"<prefix_{k}>" for k in range(1, N_PREFIX + 1)]
FIRST_PREFIX_ID = N_BASE_TOKENS + len(QWEN3_ADDED)  # 151669, as in the published compiler
N_VOCAB = FIRST_PREFIX_ID + N_PREFIX  # 151733 embedding rows
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645

# Qwen2's pre-tokenizer split (the `qwen2` pre-tokenizer in llama.cpp).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")

# A Qwen-style template (Qwen3-Instruct's shape without tools): an optional system message, then
# `<|im_start|>role\ncontent<|im_end|>\n` per message, and `<|im_start|>assistant\n` to generate.
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=128)
# Qwen3-0.6B's shape (its config.json): 28 layers, 151,936 embedding rows, rope theta 1e6, 40,960 positions.
FULL_DIMS = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
FULL_SIZE = dict(n_layer=28, n_vocab=151936, rope_theta=1000000.0, n_ctx=40960, dims=FULL_DIMS)


def qwen_vocab(vocab_dir: Path) -> tuple[list[str], list[str]]:
    """(the 151,643 base tokens, the merges) of llama.cpp's Qwen2 vocabulary file."""
    from gguf import GGUFReader

    r = GGUFReader(Path(vocab_dir) / "ggml-vocab-qwen2.gguf")
    tokens = r.fields["tokenizer.ggml.tokens"].contents()[:N_BASE_TOKENS]
    merges = r.fields["tokenizer.ggml.merges"].contents()
    assert tokens[-1] != "<|endoftext|>" and r.fields["tokenizer.ggml.tokens"].contents()[N_BASE_TOKENS] == "<|endoftext|>"
    return tokens, merges


def make_qwen_tokenizer(vocab_dir: Path):
    """The Qwen3 tokenizer (tokenizers.Tokenizer) with the 26 Qwen3 added tokens and the 64 prefix tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens, merges = qwen_vocab(vocab_dir)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     byte_fallback=False, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [AddedToken(c, special=s, normalized=not s) for c, s in QWEN3_ADDED]
    added += [AddedToken(c, special=True, normalized=False) for c in PREFIX_TOKENS]
    for a in added:  # one at a time so each id is the next one
        tok.add_tokens([a]) if not a.special else tok.add_special_tokens([a])
    assert tok.token_to_id("<|endoftext|>") == ENDOFTEXT_ID and tok.token_to_id(PREFIX_TOKENS[-1]) == N_VOCAB - 1
    return tok


_TOKENIZER_FILES: dict[Path, dict[str, bytes]] = {}  # vocab_dir -> saved files: built once per process (~3 s)


def save_qwen_tokenizer(folder: Path, vocab_dir: Path, template_in_jinja_file: bool) -> None:
    import tempfile

    from oracles import oracle

    PreTrainedTokenizerFast = oracle("transformers").PreTrainedTokenizerFast

    key = Path(vocab_dir).resolve()
    if key not in _TOKENIZER_FILES:
        hf = PreTrainedTokenizerFast(tokenizer_object=make_qwen_tokenizer(vocab_dir), bos_token=None,
                                     eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                                     additional_special_tokens=PREFIX_TOKENS, model_max_length=2048)
        hf.chat_template = CHAT_TEMPLATE
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            _TOKENIZER_FILES[key] = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    for name, data in _TOKENIZER_FILES[key].items():
        (folder / name).write_bytes(data)
    # Where the template lives depends on the transformers version: pin it to the variant asked for.
    jinja = folder / "chat_template.jinja"
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["add_bos_token"] = False
    if template_in_jinja_file:
        jinja.write_text(CHAT_TEMPLATE, encoding="utf-8")
    else:
        jinja.unlink(missing_ok=True)
        cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def make_tiny_qwen3(folder: Path, vocab_dir: Path, *, n_layer: int = 4, seed: int = 0,
                    template_in_jinja_file: bool = True, dtype: str = "bfloat16", tie_word_embeddings: bool = True,
                    max_shard_size: str | int = "40MB", init_std: float = 0.08, dims: dict | None = None,
                    n_vocab: int = N_VOCAB, rope_theta: float = 5000000.0, n_ctx: int = 2048) -> Path:
    """A deterministic random Qwen3 (see the module docstring) saved into `folder`; returns `folder`.
    `dims` (TINY_DIMS by default) and n_vocab (>= N_VOCAB: extra rows have no token, as in the
    published model) shape it; `make_tiny_qwen3(folder, vocab_dir, **FULL_SIZE)` is Qwen3-0.6B's shape.

    `dtype` is the stored weight type ("bfloat16" like the published checkpoint, "float16" or
    "float32"). Load the oracle with `transformers.AutoModelForCausalLM.from_pretrained(folder,
    dtype=torch.float32)`: a bf16 folder then holds exactly the values the F32 GGUF holds."""
    from oracles import oracle

    torch = oracle("torch")
    Qwen3Config, Qwen3ForCausalLM = oracle("transformers").Qwen3Config, oracle("transformers").Qwen3ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=n_vocab, num_hidden_layers=n_layer, max_position_embeddings=n_ctx, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                      tie_word_embeddings=tie_word_embeddings, initializer_range=init_std,
                      bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID, **(dims or TINY_DIMS))
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + torch.randn_like(p) * 0.2)
    model.to(getattr(torch, dtype)).save_pretrained(folder, max_shard_size=max_shard_size)
    save_qwen_tokenizer(folder, vocab_dir, template_in_jinja_file)
    return folder


def reference_cases(vocab_dir: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's Qwen2 tokenizer test cases: (text, expected ids)."""
    inp = (Path(vocab_dir) / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = (Path(vocab_dir) / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")
    cases = [(text, [int(t) for t in ids.split()]) for text, ids in zip(inp, out)]
    return cases


def sample_ids(n: int, seed: int = 0) -> np.ndarray:
    """Random token ids of ordinary text tokens (for parity tests)."""
    return np.random.default_rng(seed).integers(0, N_BASE_TOKENS, size=n)


def random_qwen3_lora(config, rank: int, seed: int = 1, std: float = 0.05) -> dict[str, np.ndarray]:
    """GGUF-named LoRA tensors (A and non-zero B) for the 7 target modules of every layer of a Qwen3
    of `config` (a `paw_lite.qwen3_layout.Qwen3Config`), in the order `LoraAdapter.tensors` gives."""
    from paw_lite.qwen3_layout import LORA_MODULES

    rng = np.random.default_rng(seed)
    out = {}
    for i in range(config.n_layer):
        for module in LORA_MODULES:
            d_in, d_out = config.module_dims(module)
            out[f"blk.{i}.{module}.weight.lora_a"] = (rng.standard_normal((rank, d_in)) * std).astype(np.float32)
            out[f"blk.{i}.{module}.weight.lora_b"] = (rng.standard_normal((d_out, rank)) * std).astype(np.float32)
    return out
