"""Fixtures shared by the test suite and the benchmarks of a source checkout (as numpy.testing is):
llama.cpp's real vocabularies from the llama-cpp-python sdist (`vocab`) and a tiny random Qwen3
with the real Qwen tokenizer (`qwen3`). Not part of the runtime API; `qwen3` needs the test extra
(torch, transformers). Living in the package lets both import them by name, with no sys.path edits."""
