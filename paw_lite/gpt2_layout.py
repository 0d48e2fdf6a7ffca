"""GPT-2 in GGUF terms: the hyperparameters, the tensor names and shapes, and the one place where
HF and PEFT names become GGUF names (STYLE point 2)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidFileError

ARCH = "gpt2"

# LoRA target modules: GGUF name -> (HF Conv1D module, the mapper's key suffix). Order is the mapper's
# sorted module order (attn_c_proj, c_attn, c_fc, mlp_c_proj) so it can be zipped with its output.
LORA_MODULES: dict[str, tuple[str, str]] = {
    "attn_output": ("attn.c_proj", "attn_c_proj"),
    "attn_qkv": ("attn.c_attn", "c_attn"),
    "ffn_up": ("mlp.c_fc", "c_fc"),
    "ffn_down": ("mlp.c_proj", "mlp_c_proj"),
}

# HF GPT-2 parameter names (without a "transformer." prefix) -> GGUF names.
_HF_GLOBAL = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
}
_HF_BLOCK = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
# Conv1D stores (d_in, d_out); GGUF and the runtime keep the Linear layout (d_out, d_in).
CONV1D_GGUF = frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"})
# Buffers HF keeps in some checkpoints that are not weights.
HF_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_HF_BLOCK_RE = re.compile(r"^h\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_gguf_name(name: str) -> tuple[str, bool] | None:
    """GGUF name of an HF GPT-2 tensor and whether it needs transposing; None for ignored buffers."""
    name = name.removeprefix("transformer.")
    if name == "lm_head.weight":
        return "output.weight", False
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name], False
    if HF_IGNORED.match(name):
        return None
    m = _HF_BLOCK_RE.match(name)
    if m and m.group(2) in _HF_BLOCK:
        module = _HF_BLOCK[m.group(2)]
        return f"blk.{m.group(1)}.{module}.{m.group(3)}", (module in CONV1D_GGUF and m.group(3) == "weight")
    raise InvalidFileError(f"unknown GPT-2 tensor {name!r}: no GGUF name for it")


_PEFT_RE = re.compile(r"^base_model\.model\.(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_(A|B)\.weight$")
_HF_MODULE_TO_GGUF = {hf: gguf for gguf, (hf, _) in LORA_MODULES.items()}


def peft_to_gguf_name(name: str) -> str | None:
    """`base_model.model.transformer.h.3.mlp.c_fc.lora_A.weight` -> `blk.3.ffn_up.weight.lora_a`."""
    m = _PEFT_RE.match(name)
    if not m:
        return None
    return f"blk.{m.group(1)}.{_HF_MODULE_TO_GGUF[m.group(2)]}.weight.lora_{m.group(3).lower()}"


def gguf_to_peft_name(name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight\.lora_(a|b)", name)
    if not m or m.group(2) not in LORA_MODULES:
        raise ValueError(f"not a GPT-2 LoRA tensor name: {name}")
    return f"base_model.model.transformer.h.{m.group(1)}.{LORA_MODULES[m.group(2)][0]}.lora_{m.group(3).upper()}.weight"


@dataclass(frozen=True)
class GPT2Config:
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int
    n_ff: int
    eps: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self, source: Path | str) -> "GPT2Config":
        for field in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_ff"):
            if getattr(self, field) <= 0:
                raise InvalidFileError(f"{source}: {field} is {getattr(self, field)}, expected a positive integer")
        if self.n_embd % self.n_head:
            raise InvalidFileError(f"{source}: embedding width {self.n_embd} is not divisible by {self.n_head} heads")
        if not 0 < self.eps < 1:
            raise InvalidFileError(f"{source}: layer norm epsilon {self.eps} is out of range")
        return self

    def module_dims(self, module: str) -> tuple[int, int]:
        """(d_in, d_out) of a LoRA target module."""
        d, ff = self.n_embd, self.n_ff
        return {"attn_qkv": (d, 3 * d), "attn_output": (d, d), "ffn_up": (d, ff), "ffn_down": (ff, d)}[module]

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a GPT-2 base model holds, with its NumPy shape (output.weight is optional)."""
        d = self.n_embd
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.n_vocab, d),
            "position_embd.weight": (self.n_ctx, d),
            "output_norm.weight": (d,),
            "output_norm.bias": (d,),
        }
        for i in range(self.n_layer):
            for norm in ("attn_norm", "ffn_norm"):
                shapes[f"blk.{i}.{norm}.weight"] = (d,)
                shapes[f"blk.{i}.{norm}.bias"] = (d,)
            for module in LORA_MODULES:
                d_in, d_out = self.module_dims(module)
                shapes[f"blk.{i}.{module}.weight"] = (d_out, d_in)
                shapes[f"blk.{i}.{module}.bias"] = (d_out,)
        return shapes
