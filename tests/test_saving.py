"""Saving survives crashes, never follows symbolic links out of the checkpoint, and gives ordinary modes."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from helpers import run_python

import qplug
from qplug import _io
from qplug.testing import example_tokens, tiny_llama


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def saved(int8_plugin, tmp_path):
    """A checkpoint of one model at ``tmp_path / "ckpt"`` (with a tokenizer file), and that model."""
    model = tiny_llama(seed=0)
    qplug.quantize(model, {"quant_method": "int8-weight"})
    qplug.save_quantized(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    return tmp_path / "ckpt", model


_SAVE_AND_DIE = """
import os, signal, sys
import qplug
from qplug import _io
from qplug.testing import tiny_llama

target = {target!r}
model = tiny_llama(seed=1)
qplug.quantize(model, {{"quant_method": "int8-weight"}})

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if {where!r} == "between-renames":
    _io._exchange = lambda a, b: False   # a platform without an atomic exchange: two renames
    real_replace = os.replace
    def replace(src, dst):
        if os.fspath(dst) == target:     # the second rename: the new checkpoint into place
            die()
        return real_replace(src, dst)
    os.replace = replace
elif {where!r} == "after-exchange":
    real_exchange = _io._exchange
    def exchange(a, b):
        assert real_exchange(a, b), "no atomic exchange here"
        die()
    _io._exchange = exchange
else:                                    # while the new checkpoint is being written
    real_fsync = _io._fsync_tree
    _io._fsync_tree = lambda root: die()
qplug.save_quantized(model, target)
"""


# Issue 13, item 9: a save killed at any point leaves a loadable checkpoint at the target.
@pytest.mark.parametrize(("where", "expect"), [("while-writing", "old"), ("between-renames", "new"),
                                                ("after-exchange", "new")])
def test_a_save_killed_midway_leaves_a_loadable_checkpoint(saved, where, expect):
    target, old_model = saved
    if where == "after-exchange" and _io._renameat2() is None:
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    proc = run_python(_SAVE_AND_DIE.format(target=str(target), where=where), check=False)
    assert proc.returncode == -9, proc.stderr
    new_model = tiny_llama(seed=1)
    qplug.quantize(new_model, {"quant_method": "int8-weight"})
    tokens = example_tokens(old_model)
    loaded = qplug.load_quantized(target)
    wanted = old_model if expect == "old" else new_model
    assert torch.equal(logits(loaded, tokens), logits(wanted, tokens))
    assert (target / "tokenizer.json").read_text() == "{}"
    # The interrupted swap is finished: no .ready or .old directory is left beside the target.
    assert not [p.name for p in target.parent.iterdir() if p.name.endswith((".ready", ".old"))]
    qplug.save_quantized(loaded, target)  # and saving over it works again
    assert torch.equal(logits(qplug.load_quantized(target), tokens), logits(wanted, tokens))


def test_every_file_and_directory_is_fsynced_before_the_swap(saved, monkeypatch):
    target, model = saved
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    qplug.save_quantized(model, target)
    first_rename = next(i for i, e in enumerate(events) if e[0] == "replace")
    synced = {os.path.basename(path) for kind, path in events[:first_rename] if kind == "fsync"}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= synced
    assert any(name.endswith(".partial") for name in synced)  # the staging directory itself
    # and the parent directory after each rename
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    for i in renames:
        assert events[i + 1] == ("fsync", str(target.parent))


# Issue 13, item 10: re-saving copies symbolic links as links, never what they point to.
def test_resaving_never_follows_symbolic_links_out_of_the_directory(saved, tmp_path):
    target, model = saved
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.txt").write_text("private")
    (outside / "deep" / "more.txt").write_text("private too")
    os.symlink(outside / "secret.txt", target / "notes.txt")
    os.symlink("../outside", target / "linked_dir")
    os.mkfifo(target / "a_fifo")
    qplug.save_quantized(model, target)
    assert os.readlink(target / "notes.txt") == str(outside / "secret.txt")
    assert os.readlink(target / "linked_dir") == "../outside"
    assert not (target / "a_fifo").exists()
    for root, dirs, files in os.walk(target):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            if not os.path.islink(path) and os.path.isfile(path):
                assert b"private" not in open(path, "rb").read(), path
    assert (outside / "secret.txt").read_text() == "private"


# Issue 13, item 11: modes follow the umask, or the directory being replaced.
def test_saved_checkpoints_get_ordinary_modes(int8_plugin, tmp_path):
    model = tiny_llama(seed=0)
    qplug.quantize(model, {"quant_method": "int8-weight"})
    old_umask = os.umask(0o022)
    try:
        qplug.save_quantized(model, tmp_path / "ckpt")
        assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
        for path in (tmp_path / "ckpt").iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        os.chmod(tmp_path / "ckpt", 0o750)
        qplug.save_quantized(model, tmp_path / "ckpt")
        assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o750
        qplug.quantized_config(model).to_json_file(tmp_path / "q.json")
        assert stat.S_IMODE((tmp_path / "q.json").stat().st_mode) == 0o644
        os.chmod(tmp_path / "q.json", 0o640)
        qplug.quantized_config(model).to_json_file(tmp_path / "q.json")
        assert stat.S_IMODE((tmp_path / "q.json").stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_a_streamed_tensor_is_dropped_before_the_next_is_asked_for(tmp_path):
    # quantize_checkpoint hands write_checkpoint a generator that quantizes a whole block to produce
    # the next tensor: the previous one (the embeddings, 0.13 GB at TinyLlama's size) must not be held
    # through that
    import weakref

    from safetensors.torch import load_file

    from qplug.checkpoint import write_checkpoint

    handed: list[weakref.ref] = []

    def produce():
        for index in range(3):
            assert all(ref() is None for ref in handed), "write_checkpoint still holds an earlier tensor"
            tensor = torch.full((4, 4), float(index))
            handed.append(weakref.ref(tensor))
            yield f"t{index}", tensor
            del tensor

    write_checkpoint(tmp_path / "out", produce(), {"model_type": "llama"})
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert [float(written[f"t{i}"][0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]
