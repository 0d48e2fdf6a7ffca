"""Fuzzing the readers of untrusted files: mutated `.paw` bundles and `adapter.gguf` files must be
refused with a paw_lite error (never another exception, a hang or a big allocation), and what is
accepted must satisfy every invariant the runtime relies on.

The seed corpus is made here: valid adapters of each tensor type and valid bundles, stored and
deflated. Mutations aim at the numeric header fields (counts, lengths, types, dimensions, offsets,
ZIP sizes and attributes) as well as random bytes, cuts, insertions and copied chunks.

CI runs a fixed set of cases (PAW_LITE_FUZZ_EXAMPLES, default 300 per target, derandomized). For a
longer random run: `PAW_LITE_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz_readers.py`."""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paw_lite import paths
from paw_lite.errors import PawError
from paw_lite.gpt2_layout import GPT2Config
from paw_lite.lora import LoraAdapter, describe_adapter_gguf, write_adapter_gguf
from paw_lite.program import MEMBERS, Program

from conftest import TEMPLATE, make_program, random_lora
from file_craft import gguf_fields, zip_fields

EXAMPLES = int(os.environ.get("PAW_LITE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize="PAW_LITE_FUZZ_EXAMPLES" not in os.environ,  # CI: the same cases every run
    database=None,  # no saved failing examples: a run replays nothing from earlier runs
    deadline=timedelta(seconds=30),  # a hang is a failure too (generous: the machine is shared)
    suppress_health_check=list(HealthCheck),
)
CONFIG = GPT2Config(n_vocab=50257, n_ctx=128, n_embd=64, n_head=4, n_layer=2, n_ff=256, eps=1e-5)

# Values that break parsers: zero, sign and width boundaries, and GGUF's STRING / ARRAY type codes.
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 31, 32, 33, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**63 - 1, 2**63, 2**64 - 1]

_pos = st.integers(0, 2**20)
OPS = st.lists(st.one_of(
    st.tuples(st.just("field"), _pos, st.sampled_from(INTERESTING)),
    st.tuples(st.just("field+"), _pos, st.integers(-40, 40)),
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("byte"), _pos, st.integers(0, 255)),
    st.tuples(st.just("truncate"), _pos, st.just(0)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 64)),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("copy"), _pos, st.tuples(_pos, st.integers(1, 256))),
), min_size=1, max_size=6)


class Corpus(list):
    """Seed files; a short repr keeps hypothesis's report of a failing case readable."""

    def __repr__(self) -> str:
        return f"<{len(self)} seed files>"


def mutate(raw: bytes, fields: list[tuple[int, int]], ops: list[tuple]) -> bytes:
    b = bytearray(raw)
    for kind, where, arg in ops:
        if not b:
            break
        if kind in ("field", "field+"):
            pos, width = fields[where % len(fields)]
            if pos + width > len(b):
                continue
            old = int.from_bytes(b[pos:pos + width], "little")
            new = arg if kind == "field" else old + arg
            b[pos:pos + width] = (new % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == "flip":
            b[where % len(b)] ^= 1 << arg
        elif kind == "byte":
            b[where % len(b)] = arg
        elif kind == "truncate":
            del b[where % len(b):]
        elif kind == "delete":
            i = where % len(b)
            del b[i:i + arg]
        elif kind == "insert":
            i = where % (len(b) + 1)
            b[i:i] = arg
        elif kind == "copy":
            src, n = where % len(b), arg[1]
            dst = arg[0] % len(b)
            b[dst:dst + n] = b[src:src + n]
    return bytes(b)


@pytest.fixture(scope="module", autouse=True)
def memory_guard():
    """Cap this process's address space at its current size + 3 GB while fuzzing, so a reader that
    tries a huge allocation fails with MemoryError instead of exhausting a shared machine (the
    original reader reached 10 GB on a mutated array length)."""
    try:
        import resource
    except ImportError:  # not POSIX
        resource = None
    if resource is None or not os.path.exists("/proc/self/statm"):  # the size is read from Linux's /proc
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = current + 3 * 1024**3
    if old[1] != resource.RLIM_INFINITY:
        cap = min(cap, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    yield
    resource.setrlimit(resource.RLIMIT_AS, old)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def adapter_seeds(scratch) -> Corpus:
    """Valid adapters: every tensor type, full and partial (one layer), with their header fields."""
    seeds = Corpus()
    for kind, rank, layers in (("f32", 4, 2), ("f16", 8, 1), ("q8_0", 32, 2), ("q4_0", 32, 1)):
        tensors = {n: a for n, a in random_lora(2, 64, rank, seed=rank).items() if int(n.split(".")[1]) < layers}
        path = write_adapter_gguf(scratch / f"seed-{kind}.gguf", tensors, 16.0, kind)
        LoraAdapter.from_gguf(path, CONFIG)  # the seed itself is valid
        raw = path.read_bytes()
        seeds.append((raw, gguf_fields(raw)))
    return seeds


@pytest.fixture(scope="module")
def bundle_seeds(scratch) -> Corpus:
    seeds = Corpus()
    for i, (kind, rank, compression) in enumerate((("f32", 4, zipfile.ZIP_DEFLATED), ("q4_0", 32, zipfile.ZIP_STORED))):
        path = make_program(scratch / f"seed{i}.paw", random_lora(2, 64, rank, seed=i), 16.0, kind)
        prog = Program.load(path)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            for name, data in prog.members().items():
                zf.writestr(name, data)
        raw = buf.getvalue()
        seeds.append((raw, zip_fields(raw)))
    return seeds


@pytest.fixture(scope="module")
def models_env(scratch):
    """An empty models directory, so resolving a fuzzed runtime_id never finds a real model."""
    old = os.environ.get("PAW_LITE_MODELS")
    os.environ["PAW_LITE_MODELS"] = str(scratch / "models")
    yield
    if old is None:
        del os.environ["PAW_LITE_MODELS"]
    else:
        os.environ["PAW_LITE_MODELS"] = old


def check_adapter(path: Path) -> None:
    """Read an adapter from its file and from its bytes (as a program's member is read): both give
    the same result or the same error, and an accepted one is one the runtime can apply to CONFIG."""
    outcomes = []
    for read in (lambda: LoraAdapter.from_gguf(path, CONFIG),
                 lambda: LoraAdapter.from_gguf_bytes(path.read_bytes(), CONFIG, str(path))):
        try:
            outcomes.append(read())
        except PawError as exc:
            outcomes.append(str(exc))
    from_file, from_bytes = outcomes
    if isinstance(from_file, str):
        assert from_bytes == from_file
    else:
        assert from_bytes.rank == from_file.rank and from_bytes.alpha == from_file.alpha
        assert all(np.array_equal(from_bytes.pairs[t][i], from_file.pairs[t][i]) for t in from_file.pairs for i in (0, 1))
        adapter = from_file
        assert adapter.rank > 0 and np.isfinite(adapter.alpha) and adapter.alpha > 0
        for target, (a, b) in adapter.pairs.items():
            d_in, d_out = CONFIG.module_dims(target.split(".")[2])
            assert a.shape == (adapter.rank, d_in) and b.shape == (d_out, adapter.rank)
            assert a.dtype == b.dtype == np.float32 and np.isfinite(a).all() and np.isfinite(b).all()
    try:
        describe_adapter_gguf(path.read_bytes(), str(path))
    except PawError:
        pass


def check_bundle(path: Path, scratch: Path) -> None:
    """Load a bundle; if it is accepted, its parts must be what the runtime expects, and its adapter
    goes through the adapter reader too."""
    try:
        prog = Program.load(path)
    except PawError:
        return
    assert set(prog.members()) <= set(MEMBERS)
    assert prog.template.count("{INPUT_PLACEHOLDER}") == 1
    assert prog.spec is None or isinstance(prog.spec, str)
    assert prog.pseudo_program is None or isinstance(prog.pseudo_program, str)
    try:
        paths.resolve_interpreter(None, prog.meta.get("runtime_id"))
    except PawError:
        pass
    adapter_path = scratch / "bundle-adapter.gguf"
    adapter_path.write_bytes(prog.adapter_gguf)
    check_adapter(adapter_path)


@FUZZ
@given(seed=st.integers(0, 3), ops=OPS)
def test_fuzz_adapter_reader(adapter_seeds, scratch, seed, ops):
    raw, fields = adapter_seeds[seed]
    path = scratch / "fuzz-adapter.gguf"
    path.write_bytes(mutate(raw, fields, ops))
    check_adapter(path)


@FUZZ
@given(seed=st.integers(0, 1), ops=OPS)
def test_fuzz_bundle_bytes(bundle_seeds, scratch, models_env, seed, ops):
    raw, fields = bundle_seeds[seed]
    path = scratch / "fuzz-bytes.paw"
    path.write_bytes(mutate(raw, fields, ops))
    check_bundle(path, scratch)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_meta = st.dictionaries(
    st.sampled_from(["version", "program_id", "spec", "interpreter", "runtime_id", "lora_rank", "lora_alpha",
                     "prefix_steps", "pseudo_program_strategy", "x"]) | st.text(max_size=8),
    _json_values | st.sampled_from(["gpt2", "gpt2-q8_0", "../../etc/passwd", "/abs", "", 32, 16.0, 4]), max_size=8)
_names = st.sampled_from([*MEMBERS, "../meta.json", "/meta.json", "a/../adapter.gguf", "meta.json/", "META.JSON",
                          "prefix_cache.bin", "adapter.gguf\\..", "", "x" * 300])
_member_op = st.one_of(
    st.tuples(st.just("keep")), st.tuples(st.just("drop")), st.tuples(st.just("rename"), _names),
    st.tuples(st.just("dup")), st.tuples(st.just("bytes"), OPS), st.tuples(st.just("replace"), st.binary(max_size=300)))


@FUZZ
@given(ops=st.fixed_dictionaries({name: _member_op for name in MEMBERS}), meta=st.none() | _meta,
       template=st.none() | st.text(max_size=80), compression=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
       adapter_seed=st.integers(0, 3))
def test_fuzz_bundle_members(adapter_seeds, scratch, models_env, ops, meta, template, compression, adapter_seed):
    """Structure-aware: valid ZIPs whose members are renamed, dropped, duplicated or mutated."""
    members = {
        "meta.json": json.dumps(meta if meta is not None else {"interpreter": "gpt2", "lora_rank": 4}).encode(),
        "adapter.gguf": adapter_seeds[adapter_seed][0],
        "prompt_template.txt": (template if template is not None else TEMPLATE).encode("utf-8", "surrogatepass"),
        "pseudo_program.txt": b"Task: x",
    }
    entries = []
    for name, data in members.items():
        op = ops[name]
        if op[0] == "drop":
            continue
        if op[0] == "rename":
            name = op[1]
        elif op[0] == "bytes":
            data = mutate(data, gguf_fields(data) if name == "adapter.gguf" else [(0, 1)], op[1])
        elif op[0] == "replace":
            data = op[1]
        entries.append((name, data))
        if op[0] == "dup":
            entries.append((name, data))
    path = scratch / "fuzz-members.paw"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for name, data in entries:
                zf.writestr(name or "_", data)
    check_bundle(path, scratch)
