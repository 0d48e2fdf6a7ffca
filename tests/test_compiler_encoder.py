"""The encoder pass through llama.cpp against transformers on a tiny random Qwen3 with the real Qwen
tokenizer: the token sequence of the paper, arXiv 2607.02512, and the public reimplementation avra-m3/program-as-weights-server, and the hidden states of the chosen layers."""

from __future__ import annotations

import numpy as np
import pytest

from oracles import oracle
from compiler_fixtures import tiny_qwen
from paw_lite.compiler.encoder import depth_layers, encoder_token_ids, hidden_states, prefix_token_texts
from paw_lite.compiler.hf_tokenizer import HFTokenizer
from paw_lite.compiler.prompts import minimal_prompt
from paw_lite.errors import InvalidFileError

oracle("llama_cpp", "transformers")
torch = oracle("torch")
pytestmark = pytest.mark.llama

PSEUDO = ("[PSEUDO_PROGRAM]\nTask: Classify a log line as ALERT when it reports a failure, else QUIET.\n\n"
          "Examples:\nInput: disk usage at 99% on /var\nOutput: ALERT\n\nInput: user alice logged in\nOutput: QUIET\n"
          "[END_PSEUDO_PROGRAM]")
CASES = [
    ("Classify a log line as ALERT or QUIET.", PSEUDO),
    ("Rückgabe: {task_input} → 你好 🙂, with <|im_end|> typed in the spec", "Task: echo.\n  <prefix_3> stays a token\n"),
    ("x", "y"),
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, vocab_dir):
    return tiny_qwen(tmp_path_factory, vocab_dir)


@pytest.fixture(scope="module")
def hf_model(qwen):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(qwen[0], dtype=torch.float32).eval()


def transformers_sequence(tok, spec: str, pseudo: str, n_prefix: int = 64) -> list[int]:
    """the paper, arXiv 2607.02512, and the public reimplementation avra-m3/program-as-weights-server with transformers: apply_chat_template + tokenizer, piece by piece."""
    chat = tok.apply_chat_template([{"role": "user", "content": minimal_prompt(spec)}], add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if not isinstance(chat, list) else chat
    return (list(chat) + tok(pseudo, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
            + tok.convert_tokens_to_ids(prefix_token_texts(n_prefix)))


@pytest.fixture(scope="module")
def hf_tokenizer(qwen):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen[0])


@pytest.mark.parametrize("spec,pseudo", CASES)
def test_token_sequence_equals_transformers(qwen, hf_tokenizer, spec, pseudo):
    from paw_lite.compiler.llama import LlamaModel

    folder, gguf = qwen
    want = transformers_sequence(hf_tokenizer, spec, pseudo)
    assert want[-64:] == list(range(151669, 151733)) and want[-65] == 151645
    with LlamaModel(gguf, vocab_only=True) as vocab:
        assert encoder_token_ids(vocab, spec, pseudo, 64) == want
    assert encoder_token_ids(HFTokenizer(folder), spec, pseudo, 64) == want


def test_template_in_tokenizer_config_is_used(qwen, tmp_path):
    """transformers-4 layout: the chat template inside tokenizer_config.json, no chat_template.jinja."""
    import json
    import shutil

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen[0] / name, folder / name)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (qwen[0] / "chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert encoder_token_ids(HFTokenizer(folder), *CASES[0], 64) == encoder_token_ids(HFTokenizer(qwen[0]), *CASES[0], 64)
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidFileError, match="holds no chat template"):
        encoder_token_ids(HFTokenizer(folder), *CASES[0], 64)


def test_missing_prefix_tokens_are_an_error(qwen):
    from paw_lite.compiler.llama import LlamaModel

    with LlamaModel(qwen[1], vocab_only=True) as vocab:
        with pytest.raises(InvalidFileError, match="'<prefix_65>' is not a single token"):
            encoder_token_ids(vocab, "spec", "pseudo", 65)


@pytest.mark.parametrize("n_ubatch,repeat", [(512, 3), (48, 3), (16, 1)])
def test_hidden_states_equal_transformers(qwen, hf_model, n_ubatch, repeat):
    """F32 weights, F32 KV cache, flash attention off: within 1e-4 of transformers' output_hidden_states,
    also when the prompt and the captured positions span several micro-batches."""
    from paw_lite.compiler.llama import LlamaModel

    spec, pseudo = CASES[0]
    with LlamaModel(qwen[1]) as model:
        ids = encoder_token_ids(model, spec, pseudo * repeat, 64)
        layers = depth_layers(model.n_layer, 12)
        assert layers == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
        assert n_ubatch == 512 or len(ids) > 3 * n_ubatch  # several micro-batches before and within the prefix
        got = hidden_states(model, ids, layers, 64, n_ubatch=n_ubatch)
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert got.shape == (12, 64, 256) and got.dtype == np.float32
    for i, t in enumerate(layers):
        want = out[t + 1][0, -64:].numpy()  # the output of block t; for the last block, after the final norm
        err = np.abs(got[i] - want).max()
        assert err < 1e-4, (i, t, err)
    # the last block is read after the final norm: it is transformers' last hidden state
    assert np.abs(got[-1] - out[-1][0, -64:].numpy()).max() < 1e-4


def test_hidden_states_report_progress_layer_by_layer_with_the_same_result(qwen):
    """on_progress(done, total) in token-layers: rises with every layer of every chunk (the encoder
    pass is one ~30 s evaluation on a 4B model), ends at the total, and changes no number."""
    from paw_lite.compiler.llama import LlamaModel

    spec, pseudo = CASES[0]
    with LlamaModel(qwen[1]) as model:
        ids = encoder_token_ids(model, spec, pseudo * 3, 64)
        layers = depth_layers(model.n_layer, 12)
        plain = hidden_states(model, ids, layers, 64, n_ubatch=48)
        seen = []
        reported = hidden_states(model, ids, layers, 64, n_ubatch=48, on_progress=lambda done, total: seen.append((done, total)))
    assert np.array_equal(plain, reported)
    total = len(ids) * model.n_layer
    assert {t for _, t in seen} == {total} and seen[-1][0] == total
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[0] > 0
    n_chunks = -(-(len(ids) - 64) // 48) + -(-64 // 48)
    assert len(set(done)) >= n_chunks * (model.n_layer - 1)  # a step per layer, not per chunk


def test_an_error_in_the_progress_callback_is_raised_after_the_evaluation(qwen):
    from paw_lite.compiler.llama import LlamaModel

    def fail(done, total):
        raise ValueError("progress display broke")

    with LlamaModel(qwen[1]) as model:
        ids = encoder_token_ids(model, *CASES[2], 64)
        with pytest.raises(ValueError, match="progress display broke"):
            hidden_states(model, ids, depth_layers(model.n_layer, 12), 64, on_progress=fail)


def test_a_truncated_model_is_named_before_llama_cpp_loads_it(qwen, tmp_path):
    """llama.cpp only returns NULL for a file cut short; the header walk names the tensor and the
    bytes missing, as for the files paw_lite reads itself."""
    from paw_lite.compiler.llama import LlamaModel

    data = qwen[1].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) - 4096])
    with pytest.raises(InvalidFileError, match=r"cut\.gguf: tensor \S+ .*needs bytes \d+\.\.\d+ but the file has \d+ \(truncated"):
        LlamaModel(cut)
