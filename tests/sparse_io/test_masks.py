"""Masks on disk: the zlib codec, raw fallback, format 1, the documented layout, corrupted streams (sparse_io.masks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_elsa import load_sparse_model, sparse_io, sparsity_report
from hf_elsa.sparse_io import ELSA_CONFIG_NAME, MASKS_NAME, PackedMask, get_sparsity

from .helpers import (
    assert_bit_identical,
    downgrade_to_format_1,
    masks_of,
    pruned_model,
    read_masks_raw,
    rewrite_recorded_hash,
    state,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compressed", [False, True])
def test_zlib_coded_masks_round_trip(dtype, compressed, tmp_path):
    model = pruned_model("wide").to(dtype)
    expected, masks = state(model), masks_of(model)
    model.save_pretrained(tmp_path / "m", compressed=compressed)

    stored, meta = read_masks_raw(tmp_path / "m")
    assert meta["elsa_format_version"] == str(sparse_io.FORMAT_VERSION) == "2"
    assert set(json.loads(meta["codecs"]).values()) == {"zlib"}
    raw_bytes = sum(m.bits.numel() for m in get_sparsity(model).masks.values())
    assert sum(t.numel() for t in stored.values()) < 0.5 * raw_bytes  # entropy bound at 90%: 0.469
    loaded = load_sparse_model(tmp_path / "m")
    assert loaded.dtype == dtype
    assert_bit_identical(expected, loaded, canonical_zero=compressed)
    assert all(torch.equal(masks_of(loaded)[k], masks[k]) for k in masks)


def test_incompressible_masks_are_stored_raw(tmp_path):
    model = pruned_model(sparsity=0.5)  # a 50% magnitude mask is ~random bits: zlib cannot shrink them
    model.save_pretrained(tmp_path / "m")
    stored, meta = read_masks_raw(tmp_path / "m")
    codecs = json.loads(meta["codecs"])
    assert "none" in codecs.values()
    for key, data in stored.items():
        bits = get_sparsity(model).masks[key].bits
        assert torch.equal(data, bits) if codecs[key] == "none" else data.numel() < bits.numel()
    assert_bit_identical(state(model), load_sparse_model(tmp_path / "m"))


@pytest.mark.parametrize("compressed", [False, True])
def test_format_1_folder_with_raw_masks_still_loads(compressed, tmp_path):
    model = pruned_model("wide")
    expected, masks = state(model), masks_of(model)
    model.save_pretrained(tmp_path / "old", compressed=compressed)
    downgrade_to_format_1(tmp_path / "old")
    stored, meta = read_masks_raw(tmp_path / "old")
    assert meta["elsa_format_version"] == "1" and "codecs" not in meta
    assert all(stored[k].numel() == (v.numel() + 7) // 8 for k, v in masks.items())

    loaded = load_sparse_model(tmp_path / "old")
    assert_bit_identical(expected, loaded, canonical_zero=compressed)
    assert all(torch.equal(masks_of(loaded)[k], masks[k]) for k in masks)
    report = sparsity_report(tmp_path / "old")
    assert report.zeros == sparsity_report(model).zeros
    if compressed:
        values = sum(m.sum().item() for m in masks.values()) * 4
        assert sum(t.stored_bytes for t in report.tensors) == values + sum(t.numel() for t in stored.values())

    loaded.save_pretrained(tmp_path / "new", compressed=compressed)  # re-saved in the current format
    _, meta = read_masks_raw(tmp_path / "new")
    assert meta["elsa_format_version"] == "2" and "codecs" in meta
    assert json.loads((tmp_path / "new" / ELSA_CONFIG_NAME).read_text())["elsa_format_version"] == 2
    assert (tmp_path / "new" / MASKS_NAME).stat().st_size < (tmp_path / "old" / MASKS_NAME).stat().st_size
    assert_bit_identical(expected, load_sparse_model(tmp_path / "new"), canonical_zero=compressed)


def test_masks_file_is_bit_packed_zlib_coded_with_shapes(tmp_path):
    """The documented layout, read with zlib and numpy only (no hf_elsa)."""
    model = pruned_model("wide")
    model.save_pretrained(tmp_path / "m")
    masks, meta = read_masks_raw(tmp_path / "m")
    assert meta["bitorder"] == "little" and meta["elsa_format_version"] == "2"
    shapes, codecs = json.loads(meta["shapes"]), json.loads(meta["codecs"])
    packed_bytes, kept = json.loads(meta["packed_bytes"]), json.loads(meta["kept"])
    for key, stream in masks.items():
        weight = model.get_parameter(key)
        assert stream.dtype == torch.uint8 and stream.ndim == 1 and codecs[key] == "zlib"
        packed = zlib.decompress(stream.numpy().tobytes())  # a standard zlib stream
        assert len(packed) == packed_bytes[key] == (weight.numel() + 7) // 8
        assert tuple(shapes[key]) == tuple(weight.shape)
        bits = np.unpackbits(np.frombuffer(packed, np.uint8), count=weight.numel(), bitorder="little")
        assert torch.equal(torch.from_numpy(bits.astype(bool)).reshape(weight.shape), weight != 0)
        assert kept[key] == int(bits.sum())
        unpacked = PackedMask(torch.frombuffer(bytearray(packed), dtype=torch.uint8), tuple(shapes[key]), 0).unpack()
        assert torch.equal(unpacked, weight != 0)


def _flip_middle(stream: bytes, meta: dict, key: str):
    data = bytearray(stream)
    data[len(data) // 2] ^= 0xFF
    return bytes(data), meta


def _longer(stream: bytes, meta: dict, key: str):  # a valid stream of too many bytes
    return zlib.compress(zlib.decompress(stream) + bytes(8)), meta


def _unknown_codec(stream: bytes, meta: dict, key: str):
    codecs = json.loads(meta["codecs"])
    codecs[key] = "zstd"
    return stream, {**meta, "codecs": json.dumps(codecs)}


@pytest.mark.parametrize(
    "damage, message",
    [
        (_flip_middle, "zlib stream"),
        (lambda s, m, k: (s[: len(s) // 2], m), "ends early"),
        (lambda s, m, k: (s + b"\x00\x01", m), "stray bytes"),
        (_longer, "more than"),
        (lambda s, m, k: (s[:-1] + bytes([s[-1] ^ 1]), m), "zlib stream is corrupted"),  # adler32 check
        (_unknown_codec, "codec 'zstd'"),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_corrupted_mask_stream_is_rejected_naming_file_and_tensor(compressed, damage, message, tmp_path):
    pruned_model("wide").save_pretrained(tmp_path / "m", compressed=compressed)
    key = "model.layers.0.mlp.down_proj.weight"
    masks, meta = read_masks_raw(tmp_path / "m")
    stream, meta = damage(masks[key].numpy().tobytes(), meta, key)
    masks[key] = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    save_file(masks, tmp_path / "m" / MASKS_NAME, metadata=meta)  # a well-formed file, a bad stream inside
    with pytest.raises(ValueError, match=rf"{MASKS_NAME}.*(SHA-256 differs|were saved: the file is truncated)"):
        load_sparse_model(tmp_path / "m")
    rewrite_recorded_hash(tmp_path / "m", MASKS_NAME)  # past the checksum: the stream itself is checked
    with pytest.raises(ValueError, match=rf"{MASKS_NAME}: mask '{key}'.*{message}") as err:
        load_sparse_model(tmp_path / "m")
    assert "corrupted" in str(err.value) or "newer hf_elsa" in str(err.value)
    with pytest.raises(ValueError, match=rf"{MASKS_NAME}: mask '{key}'"):
        sparsity_report(tmp_path / "m")  # hf-elsa inspect reads the masks the same way


# -- malformed masks metadata and decompression bombs -------------------------------------------------------------

K = "model.layers.0.mlp.up_proj.weight"  # 64 x 32 in the tiny llama


def _set(field: str, value, entry: bool | None = None):
    """Replace one metadata field: a string is its new text, anything else (or ``entry=True``) the value of its
    entry ``K``; ``None`` deletes the field."""

    def edit(meta: dict) -> dict:
        meta = dict(meta)
        if value is None:
            del meta[field]
        elif isinstance(value, str) and not entry:
            meta[field] = value
        else:
            meta[field] = json.dumps({**json.loads(meta[field]), K: value})
        return meta

    return edit


BAD_MASK_METADATA = [
    (_set("shapes", "abc"), "shapes"),  # not JSON
    (_set("shapes", '"abc"'), "shapes"),  # JSON, not an object
    (_set("shapes", "[1, 2]"), "shapes"),
    (_set("shapes", "{"), "shapes"),
    (_set("shapes", ["a", "b"]), f"shapes['{K}']"),
    (_set("shapes", {"x": 1}), f"shapes['{K}']"),
    (_set("shapes", [-64, 32]), f"shapes['{K}']"),
    (_set("shapes", [64.0, 32]), f"shapes['{K}']"),
    (_set("shapes", []), f"shapes['{K}']"),
    (_set("shapes", [2**40, 2**40]), f"shapes['{K}']"),
    (_set("shapes", [True, 32]), f"shapes['{K}']"),
    (_set("kept", "x"), "kept"),
    (_set("kept", [1]), f"kept['{K}']"),
    (_set("kept", -1), f"kept['{K}']"),
    (_set("kept", 10**6), f"kept['{K}']"),  # more than the 2,048 weights of the shape
    (_set("kept", "7"), "kept"),
    (_set("codecs", 5), f"codecs['{K}']"),
    (_set("packed_bytes", "x", entry=True), f"packed_bytes['{K}']"),
    (_set("kept", "x", entry=True), f"kept['{K}']"),
    (_set("shapes", "abc", entry=True), f"shapes['{K}']"),
    (_set("elsa_format_version", "two"), "elsa_format_version"),
    (_set("elsa_format_version", "0"), "elsa_format_version"),
    (_set("shapes", None), "shapes"),
    (_set("kept", None), "kept"),
    (_set("codecs", None), "codecs"),
]


@pytest.mark.parametrize("edit, key", BAD_MASK_METADATA)
@pytest.mark.parametrize("compressed", [False, True])
def test_malformed_masks_metadata_is_a_value_error_naming_file_and_key(edit, key, compressed, tmp_path):
    pruned_model().save_pretrained(tmp_path / "m", compressed=compressed)
    stored, meta = read_masks_raw(tmp_path / "m")
    save_file(stored, tmp_path / "m" / MASKS_NAME, metadata=edit(meta))
    rewrite_recorded_hash(tmp_path / "m", MASKS_NAME)  # consistent checksums: the metadata itself is checked
    for read in (load_sparse_model, sparsity_report):  # load and hf-elsa inspect
        with pytest.raises(ValueError) as err:
            read(tmp_path / "m")
        message = str(err.value)
        assert MASKS_NAME in message and key in message, message


def _bomb(folder: Path, key: str, side: int = 16384) -> None:
    """Replace ``key``'s mask by one declaring ``side x side`` weights, all pruned: a zlib stream of zeros a few
    tens of kB long that decodes to ``side**2 / 8`` bytes -- with consistent metadata and checksums."""
    stored, meta = read_masks_raw(folder)
    coder = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    stream = b"".join(coder.compress(zeros) for _ in range(side * side // 8 >> 20)) + coder.flush()
    stored[key] = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    fields = {k: json.loads(meta[k]) for k in ("shapes", "kept", "codecs", "packed_bytes")}
    fields["shapes"][key], fields["kept"][key] = [side, side], 0
    fields["codecs"][key], fields["packed_bytes"][key] = "zlib", side * side // 8
    save_file(stored, folder / MASKS_NAME, metadata={**meta, **{k: json.dumps(v) for k, v in fields.items()}})
    rewrite_recorded_hash(folder, MASKS_NAME)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_mask_bomb_is_refused_before_it_is_decoded(compressed, tmp_path):
    pruned_model().save_pretrained(tmp_path / "m", compressed=compressed)
    _bomb(tmp_path / "m", K)
    assert (tmp_path / "m" / MASKS_NAME).stat().st_size < 100_000  # a 33.5 MB mask in a few tens of kB
    for read in (load_sparse_model, sparsity_report):
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=rf"{MASKS_NAME}: '{K}' has shape \(64, 32\).*refused before decod"):
                read(tmp_path / "m")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 20e6, f"{read.__name__} allocated {peak / 1e6:.0f} MB"  # the decoded mask alone is 33.5 MB


BOMB_RSS = textwrap.dedent(
    """
    import resource, sys
    from hf_elsa import load_sparse_model, sparsity_report
    for read in (load_sparse_model, sparsity_report):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read({folder!r})
        except ValueError as exc:
            assert "refused before decoding" in str(exc), exc
        else:
            sys.exit("the bomb was read")
        print(read.__name__, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10 s
def test_a_mask_bomb_costs_no_memory_in_a_fresh_process(tmp_path):
    """Peak RSS of a fresh process (the 2.3 GB the unchecked decoder reached would show) around load and inspect."""
    pruned_model().save_pretrained(tmp_path / "m")
    _bomb(tmp_path / "m", K)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = BOMB_RSS.format(folder=str(tmp_path / "m"))
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    growth = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("load", "sparsity")))
    assert set(growth) == {"load_sparse_model", "sparsity_report"}
    assert all(int(mb) < 40 for mb in growth.values()), growth  # MB of peak RSS growth
