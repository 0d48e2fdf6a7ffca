"""The torch-free checkpoint reader: identical to torch.load on what torch.save writes; refuses code,
malformed and truncated files with InvalidFileError and never runs anything.

Oracle: torch.load(weights_only=True) on the same files."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracles import oracle
from paw_lite.convert.torch_checkpoint import load, load_state_dict
from paw_lite.errors import InvalidFileError

torch = oracle("torch")


def as_numpy(t) -> np.ndarray:
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def assert_same(ours, ref) -> None:
    """Same structure, same values bit for bit, same dtype, shape and (for tensors) strides."""
    if isinstance(ref, torch.Tensor):
        want = as_numpy(ref)
        assert isinstance(ours, np.ndarray) and ours.dtype == want.dtype and ours.shape == want.shape
        assert np.array_equal(ours.view(np.uint8) if ours.dtype == bool else ours, want.view(np.uint8) if want.dtype == bool else want,
                              equal_nan=ours.dtype.kind == "f")
        if ref.dtype != torch.bfloat16 and ref.numel() > 1:  # views keep torch's strides
            assert ours.strides == tuple(s * ref.element_size() for s in ref.stride())
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref)
        for k in ref:
            assert_same(ours[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        for a, b in zip(ours, ref):
            assert_same(a, b)
    else:
        assert ours == ref and type(ours) is type(ref)


def roundtrip(obj, path: Path):
    torch.save(obj, path)
    ref = torch.load(path, weights_only=True)
    ours = load(path)
    assert_same(ours, ref)
    return ours


def test_dtypes_views_and_shared_storage(tmp_path):
    base = torch.randn(6, 10)
    sd = collections.OrderedDict(
        f32=base, transposed=base.t(), sliced=base[1:5:2, 3:9], row=base[2],
        f16=torch.randn(3, 5).half(), bf16=torch.randn(4, 4).bfloat16(), f64=torch.randn(3).double(),
        i64=torch.arange(-5, 5), i32=torch.arange(7, dtype=torch.int32), i8=torch.tensor([-128, 0, 127], dtype=torch.int8),
        u8=torch.arange(250, 256, dtype=torch.uint8), flags=torch.tensor([True, False, True]), scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3), param=torch.nn.Parameter(torch.ones(2, 2)),
        special=torch.tensor([float("inf"), -0.0, float("nan"), 1e-40]),
    )
    ours = roundtrip(sd, tmp_path / "sd.pt")
    assert isinstance(ours, collections.OrderedDict)
    # views of one storage share memory in ours as in torch (one map, not copies)
    assert np.shares_memory(ours["f32"], ours["transposed"]) and np.shares_memory(ours["f32"], ours["sliced"])
    assert not ours["f32"].flags.writeable


def test_module_state_dict_and_nested_containers(tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ours = roundtrip(lin.state_dict(), tmp_path / "lin.pt")
    assert ours._metadata[""] == {"version": 1}  # torch's BUILD state of the OrderedDict
    roundtrip({"a": [1, 2.5, "x", None, True, (3, torch.ones(2))], "b": {"c": torch.zeros(1)}, -1: "str"}, tmp_path / "nested.pt")


def test_load_state_dict_requires_flat_mapping(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "nested.pt")
    with pytest.raises(InvalidFileError, match="not a flat state dict"):
        load_state_dict(tmp_path / "nested.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(InvalidFileError, match="holds a list, expected a state dict"):
        load_state_dict(tmp_path / "list.pt")


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int16, torch.uint8]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), dtype=st.sampled_from(_DTYPES), seed=st.integers(0, 2**31),
       data=st.data())
def test_random_views_match_torch(tmp_path, shape, dtype, seed, data):
    """Any permutation / slice / select of a tensor of any supported dtype reads back as torch sees it."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * 100).to(dtype)
    perm = data.draw(st.permutations(range(len(shape))))
    view = t.permute(*perm)
    dim = data.draw(st.integers(0, view.dim() - 1))
    start = data.draw(st.integers(0, view.shape[dim] - 1))
    view = view.narrow(dim, start, view.shape[dim] - start)
    roundtrip({"base": t, "view": view, "step": t.flatten()[::2]}, tmp_path / "h.pt")


# --- refusal: code, malformed and truncated files ------------------------------------------------

class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalsCode:
    def __reduce__(self):
        return eval, ("open('/nonexistent-paw-lite-marker', 'w')",)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "x": _RunsCommand(marker)}, bad)
    with pytest.raises(InvalidFileError, match=r"refers to (posix|os)\.system.*refused"):
        load(bad)
    assert not marker.exists()
    # the payload is real: an unrestricted unpickler would have run it
    code = f"import torch; torch.load({str(bad)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_eval_global_refused_at_every_protocol(tmp_path, protocol):
    path = tmp_path / "eval.pt"
    torch.save([_EvalsCode()], path, pickle_protocol=protocol)
    with pytest.raises(InvalidFileError, match=r"(builtins|__builtin__)\.eval"):
        load(path)


def _rewrite_pickle(src: Path, dst: Path, edit) -> Path:
    """Copy a torch zip, passing data.pkl through `edit(bytes) -> bytes`; members stay uncompressed."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, edit(data) if info.filename.endswith("data.pkl") else data)
    return dst


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(24, dtype=torch.float32).reshape(4, 6)}, path)
    return path


@pytest.mark.parametrize("what,edit,match", [
    ("storage size", lambda b: b.replace(b"K\x18t", b"K\x19t", 1), "holds 96 bytes, but the pickle declares 25 elements"),
    ("extent", lambda b: b.replace(b"K\x06K\x01\x86", b"K\x07K\x01\x86", 1), "reaches element 26 of a storage of 24"),
    ("size", lambda b: b.replace(b"K\x04K\x06\x86", b"K\x05K\x06\x86", 1), "more elements than its storage"),
    ("global", lambda b: b.replace(b"ccollections\nOrderedDict\n", b"cbuiltins\nexec\n", 1), "builtins.exec"),
    ("opcode", lambda b: b.replace(b"\x80\x02", b"\x80\x02(c__main__\nX\no", 1), "__main__.X"),
    ("inst opcode", lambda b: b.replace(b"\x80\x02", b"\x80\x02(i__main__\nX\n", 1), "opcode INST is not allowed"),
    ("stop", lambda b: b[:-1], "without STOP|before seeing STOP"),
    ("persistent id", lambda b: b.replace(b"storage", b"stowage", 1), "unsupported persistent id"),
    ("storage key", lambda b: b.replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x00/", 1), "malformed storage record"),
])
def test_malformed_pickles_refused(tmp_path, what, edit, match):
    path = _rewrite_pickle(_saved(tmp_path), tmp_path / "bad.pt", edit)
    with pytest.raises(InvalidFileError, match=match):
        load(path)


def test_truncated_files_refused(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for n in sorted({0, 1, 3, 4, 30, 64, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 22, len(data) - 1}):
        cut.write_bytes(data[:n])
        with pytest.raises(InvalidFileError):
            load(cut)


def test_not_torch_zip_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(InvalidFileError, match="legacy .pre-1.6. torch file"):
        load(legacy)
    plain = tmp_path / "x.pt"
    plain.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(InvalidFileError, match="not a torch zip checkpoint"):
        load(plain)
    compressed = tmp_path / "deflated.pt"
    with zipfile.ZipFile(_saved(tmp_path)) as zin, zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(InvalidFileError, match="is compressed"):
        load(compressed)


def test_expanded_view_refused(tmp_path):
    """A stride-0 view claims more elements than its storage: refused before anything is allocated."""
    path = tmp_path / "exp.pt"
    torch.save({"w": torch.ones(1, 3).expand(1000, 3)}, path)
    with pytest.raises(InvalidFileError, match="more elements than its storage"):
        load(path)


def test_big_endian_refused(tmp_path):
    path = _saved(tmp_path)
    out = tmp_path / "be.pt"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, b"big" if info.filename.endswith("byteorder") else zin.read(info))
    with pytest.raises(InvalidFileError, match="only little-endian"):
        load(out)


def test_hostile_archives_and_calls_are_invalid_files_not_tracebacks(tmp_path):
    """Review findings: a call with the wrong arguments, and ZIP features zipfile itself refuses
    (encryption, an unknown compression method), surfaced as raw TypeError, RuntimeError and
    NotImplementedError."""
    from file_craft import patch_zip_entry

    arity = _rewrite_pickle(_saved(tmp_path), tmp_path / "arity.pt",
                            lambda b: b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + b"K\x01" * 9 + b"tR.")
    with pytest.raises(InvalidFileError, match="malformed pickle: TypeError"):
        load(arity)
    raw = _saved(tmp_path).read_bytes()
    name = next(n for n in zipfile.ZipFile(_saved(tmp_path)).namelist() if n.endswith("data.pkl"))
    for field, value in (("flags", 1), ("method", 99)):
        bad = tmp_path / f"{field}.pt"
        bad.write_bytes(patch_zip_entry(raw, name, field, value))
        with pytest.raises(InvalidFileError):
            load(bad)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "m.pt"
    os.mkfifo(fifo)
    with pytest.raises(InvalidFileError, match="not a regular file"):
        load(fifo)
