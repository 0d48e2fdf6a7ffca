"""llama.cpp (through llama-cpp-python) as an oracle: greedy decoding on a GGUF with an adapter."""

from __future__ import annotations

import numpy as np

from oracles import oracle


def llama_greedy(model_path, lora_path, prompt_ids: list[int], max_tokens: int, n_ctx: int, eos: int = 50256) -> list[int]:
    llama_cpp = oracle("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=n_ctx,
                          n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2, verbose=False, seed=0, logits_all=True)
    try:
        llm.eval(prompt_ids)
        out: list[int] = []
        while len(out) < max_tokens and llm.n_tokens < n_ctx:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token == eos:
                break
            out.append(token)
            if len(out) < max_tokens and llm.n_tokens < n_ctx - 1:
                llm.eval([token])
            else:
                break
        return out
    finally:
        llm.close()


def assert_same_or_near_tie(ours: list[int], theirs: list[int], prompt_ids: list[int], hf, tol: float, eos: int = 50256) -> None:
    """llama.cpp's greedy tokens against ours: equal, or the first step where they part (EOS counts
    as a token) is a near-tie in the fp32 oracle `hf` (transformers): its logits of the two tokens
    within `tol`. ggml's fp16 GELU table (~1e-3) and its activation rounding with quantized
    weights can flip such a step, nothing else can."""
    torch = oracle("torch")

    a, b = ours + [eos], theirs + [eos]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            with torch.no_grad():
                logits = hf(torch.tensor([prompt_ids + ours[:i]])).logits[0, -1]
            assert abs(float(logits[x] - logits[y])) < tol, (i, x, y, float(logits[x] - logits[y]))
            return
        if x == eos:
            return


def official_agrees(theirs, ours, hf, inputs: list[str], max_tokens: int, eos: int = 50256) -> tuple[int, set[str]]:
    """The official SDK's function `theirs` (llama.cpp) against paw_lite's `ours` on each input:
    llama.cpp evaluated our prompt, its greedy tokens equal ours or part at a near-tie in `hf`
    (`assert_same_or_near_tie`, tol 1e-2), and where the tokens are equal so are the texts.
    Returns how many inputs were equal token for token, and the SDK's distinct outputs."""
    exact, outputs = 0, set()
    for text in inputs:
        their_text = theirs(text, max_tokens=max_tokens)
        # The SDK returns text only; the ids llama.cpp evaluated show its prompt and its greedy
        # choices (read from its Llama object, not changed).
        evaluated = [int(t) for t in theirs._llm.input_ids[:theirs._llm.n_tokens]]
        prompt = ours.prompt_ids(text)
        assert evaluated[:len(prompt)] == prompt, repr(text)
        their_ids, our_ids = evaluated[len(prompt):], ours.generate_ids(text, max_tokens=max_tokens)
        assert_same_or_near_tie(our_ids, their_ids, prompt, hf, tol=1e-2, eos=eos)
        if our_ids == their_ids:
            assert ours(text, max_tokens=max_tokens) == their_text, repr(text)
            exact += 1
        outputs.add(their_text)
    return exact, outputs
