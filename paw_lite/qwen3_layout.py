"""Qwen3 in GGUF terms: the hyperparameters, the tensor names and shapes, the LoRA target modules
and the one place where HF / PEFT names become GGUF names (as gpt2_layout.py is for GPT-2).

Used by the converter (`paw-lite convert qwen3`), the Standard-program interpreter (Qwen3-0.6B) and
the compiler's mapper for Standard programs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import IncompatibleModelError, InvalidFileError, ModelNotFoundError
from .gguf_file import get_field, get_float, get_int

ARCH = "qwen3"

# LoRA target modules of a Standard program: GGUF name -> (HF module inside a decoder layer, the
# mapper's key suffix). Order is the mapper's sorted suffix order (down_proj, gate_proj, k_proj,
# o_proj, q_proj, up_proj, v_proj), which lays out its coefficient vector; module names as in the
# public reimplementation avra-m3/program-as-weights-server (src/paw_server/compile/profiles.py).
LORA_MODULES: dict[str, tuple[str, str]] = {
    "ffn_down": ("mlp.down_proj", "down_proj"),
    "ffn_gate": ("mlp.gate_proj", "gate_proj"),
    "attn_k": ("self_attn.k_proj", "k_proj"),
    "attn_output": ("self_attn.o_proj", "o_proj"),
    "attn_q": ("self_attn.q_proj", "q_proj"),
    "ffn_up": ("mlp.up_proj", "up_proj"),
    "attn_v": ("self_attn.v_proj", "v_proj"),
}
assert [s for _, s in LORA_MODULES.values()] == sorted(s for _, s in LORA_MODULES.values())

_PEFT_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                      r"\.lora_(A|B)\.weight$")
_HF_MODULE_TO_GGUF = {hf: gguf for gguf, (hf, _) in LORA_MODULES.items()}


def peft_to_gguf_name(name: str) -> str | None:
    """`base_model.model.model.layers.3.mlp.up_proj.lora_A.weight` -> `blk.3.ffn_up.weight.lora_a`."""
    m = _PEFT_RE.match(name)
    if not m:
        return None
    return f"blk.{m.group(1)}.{_HF_MODULE_TO_GGUF[m.group(2)]}.weight.lora_{m.group(3).lower()}"


def gguf_to_peft_name(name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight\.lora_(a|b)", name)
    if not m or m.group(2) not in LORA_MODULES:
        raise ValueError(f"not a Qwen3 LoRA tensor name: {name}")
    return f"base_model.model.model.layers.{m.group(1)}.{LORA_MODULES[m.group(2)][0]}.lora_{m.group(3).upper()}.weight"


@dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 hyperparameters in GGUF terms, from an HF config.json or a GGUF file's `qwen3.*` keys."""

    n_vocab: int
    n_ctx: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope_theta: float
    tied: bool

    @classmethod
    def from_hf(cls, path: Path) -> "Qwen3Config":
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelNotFoundError(f"{path}: no config.json; pass an HF Qwen3 model folder") from exc
        except (OSError, ValueError) as exc:
            raise InvalidFileError(f"{path}: cannot read the model config: {exc}") from exc
        if cfg.get("model_type") != "qwen3":
            raise IncompatibleModelError(f"{path}: model_type is {cfg.get('model_type')!r}, expected 'qwen3'")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias"):
            raise IncompatibleModelError(f"{path}: hidden_act {cfg.get('hidden_act')!r} / attention_bias "
                                         f"{cfg.get('attention_bias')!r}: Qwen3 uses silu and no attention bias")
        # transformers 5 keeps rope settings in `rope_parameters`; older files use rope_theta/rope_scaling.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise IncompatibleModelError(f"{path}: rope type {rope_type!r} is not supported (only the default rotary embedding)")
        if cfg.get("use_sliding_window"):
            raise IncompatibleModelError(f"{path}: use_sliding_window is true; only full attention is supported")
        try:
            n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            out = cls(
                n_vocab=int(cfg["vocab_size"]),
                n_ctx=int(cfg["max_position_embeddings"]),
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_layer=int(cfg["num_hidden_layers"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                tied=bool(cfg.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidFileError(f"{path}: missing or malformed Qwen3 hyperparameter: {exc}") from exc
        return out.validate(path)

    @classmethod
    def from_gguf(cls, index, path: Path | str) -> "Qwen3Config":
        """The `qwen3.*` keys of a GGUF file (llama.cpp's names); n_vocab is the token list's length,
        the output is tied unless the file holds `output.weight`."""
        a = ARCH
        n_embd, n_head = get_int(index, f"{a}.embedding_length", path), get_int(index, f"{a}.attention.head_count", path)
        n_vocab = len(get_field(index, "tokenizer.ggml.tokens", path))
        out = cls(
            n_vocab=n_vocab, n_ctx=get_int(index, f"{a}.context_length", path), n_embd=n_embd,
            n_ff=get_int(index, f"{a}.feed_forward_length", path), n_layer=get_int(index, f"{a}.block_count", path),
            n_head=n_head, n_head_kv=get_int(index, f"{a}.attention.head_count_kv", path, default=n_head),
            head_dim=get_int(index, f"{a}.attention.key_length", path, default=n_embd // max(n_head, 1)),
            eps=get_float(index, f"{a}.attention.layer_norm_rms_epsilon", path),
            rope_theta=get_float(index, f"{a}.rope.freq_base", path, default=10000.0),
            tied="output.weight" not in index.tensors)
        return out.validate(path)

    def validate(self, source: Path | str) -> "Qwen3Config":
        if min(self.n_vocab, self.n_ctx, self.n_embd, self.n_ff, self.n_layer, self.n_head, self.n_head_kv,
               self.head_dim) <= 0 or self.n_head % self.n_head_kv:
            raise InvalidFileError(f"{source}: inconsistent Qwen3 hyperparameters {self}")
        if not 0 < self.eps < 1 or not self.rope_theta > 0:
            raise InvalidFileError(f"{source}: RMSNorm epsilon {self.eps} or rope theta {self.rope_theta} is out of range")
        return self

    def module_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a LoRA target module (GGUF name)."""
        q, kv, d, ff = self.n_head * self.head_dim, self.n_head_kv * self.head_dim, self.n_embd, self.n_ff
        return {"attn_q": (d, q), "attn_k": (d, kv), "attn_v": (d, kv), "attn_output": (q, d),
                "ffn_gate": (d, ff), "ffn_up": (d, ff), "ffn_down": (ff, d)}[module]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF name -> NumPy shape (rows, cols) of every tensor the file must hold."""
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.n_vocab, self.n_embd), "output_norm.weight": (self.n_embd,)}
        if not self.tied:
            shapes["output.weight"] = (self.n_vocab, self.n_embd)
        for i in range(self.n_layer):
            shapes.update({
                f"blk.{i}.attn_norm.weight": (self.n_embd,), f"blk.{i}.attn_q.weight": (q, self.n_embd),
                f"blk.{i}.attn_k.weight": (kv, self.n_embd), f"blk.{i}.attn_v.weight": (kv, self.n_embd),
                f"blk.{i}.attn_output.weight": (self.n_embd, q), f"blk.{i}.attn_q_norm.weight": (self.head_dim,),
                f"blk.{i}.attn_k_norm.weight": (self.head_dim,), f"blk.{i}.ffn_norm.weight": (self.n_embd,),
                f"blk.{i}.ffn_gate.weight": (self.n_ff, self.n_embd), f"blk.{i}.ffn_up.weight": (self.n_ff, self.n_embd),
                f"blk.{i}.ffn_down.weight": (self.n_embd, self.n_ff),
            })
        return shapes
