"""Calibration data for the methods that calibrate (GPTQ, AWQ): what users give, as token samples.

One set of rules for every backend and for the CLI. Accepted:

* token ids: a LongTensor ``[samples, seq]`` or ``[seq]``; a list of token-id lists or 1-D/2-D
  integer tensors (each row one sample); a dict or ``BatchEncoding`` with ``input_ids`` (and
  optionally ``attention_mask``), alone or in a list;
* texts: a string or a list of strings, tokenized with the ``tokenizer`` given (a Hugging Face
  tokenizer, or any callable returning ``{"input_ids": ...}``);
* a file (a :class:`pathlib.Path`), in one of the formats of :func:`read_file`;
* :class:`Sample` records, as :func:`token_samples` returns them.

:func:`token_samples` turns any of them into :class:`Sample` records. The two ways backends
feed samples to a model are here too, so both read the same samples:
:func:`padded_batches` (one forward per batch, GPTQ) and :func:`token_blocks` (one tensor of
equal-length rows, AWQ). Every mistake raises :class:`~qplug.QuantConfigError` naming
``calibration`` (and the sample at fault), a ``ValueError`` and a ``TypeError`` both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from qplug.errors import QuantConfigError

if TYPE_CHECKING:
    import torch

    from qplug.config import QuantConfig

__all__ = [
    "FILE_FORMATS",
    "Sample",
    "check_given",
    "holds_texts",
    "padded_batches",
    "read_file",
    "token_blocks",
    "token_samples",
]

#: What :func:`read_file` reads, by file suffix (shown in help texts and errors).
FILE_FORMATS = (
    ".jsonl (one sample a line: a token-id list, a string, or {\"text\": ...} / {\"input_ids\": ...}), "
    ".json (a list of token-id lists or of strings), .safetensors (an integer tensor 'input_ids'), "
    "or plain text (one sample per non-empty line)"
)

_WHAT = "token ids (a LongTensor [samples, seq] or token-id lists), or texts with a tokenizer"


@attrs.frozen
class Sample:
    """One calibration sample: 1-D ``int64`` token ids and the attention mask of the same length."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def _error(field: str, value: Any, accepted: str) -> QuantConfigError:
    return QuantConfigError(field=field, value=value, accepted=accepted)


def check_given(config: QuantConfig, calibration: Any) -> None:
    """Refuse a missing ``calibration`` for a config that needs one, before any work is done.

    :raises QuantConfigError: ``config.needs_calibration()`` and ``calibration`` is ``None``.
    """
    if calibration is None and config.needs_calibration():
        raise _error(
            "calibration",
            None,
            f"{config.quant_method} calibrates on sample inputs: pass calibration= {_WHAT}",
        )


def token_samples(calibration: Any, *, tokenizer: Any = None, method: str = "this method") -> list[Sample]:
    """Every sample in ``calibration`` (see the module docstring for what is accepted).

    :param tokenizer: tokenizes texts; without one, texts are refused.
    :param method: the method's name, for messages (``"gptq"``).
    :raises QuantConfigError: nothing given, no samples, an empty sample, float or bool ids, a
        text without a tokenizer, an unreadable file; the message names the sample at fault.
    """
    import torch

    if calibration is None:
        raise _error("calibration", None, f"{method} calibrates on sample inputs: pass calibration= {_WHAT}")
    if isinstance(calibration, os.PathLike):
        calibration = read_file(calibration)
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, (torch.Tensor, Sample)) or _is_encoding(calibration):
        items: list[Any] = [calibration]
        names = ["calibration"]
    elif isinstance(calibration, Iterable):
        items = list(calibration)
        names = [f"calibration[{k}]" for k in range(len(items))]
        # a flat list of ints is one sample, as a 1-D tensor is
        if items and all(_is_int(t) for t in items):
            items, names = [items], ["calibration"]
    else:
        raise _error("calibration", calibration, f"expected {_WHAT}")
    if not items:
        raise _error("calibration", calibration, f"no samples: expected {_WHAT}")
    samples: list[Sample] = []
    for name, item in zip(names, items, strict=True):
        samples.extend(_item_samples(name, item, tokenizer, method))
    return samples


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_encoding(value: Any) -> bool:
    """A dict or ``BatchEncoding`` holding ``input_ids``."""
    return isinstance(value, Mapping) or hasattr(value, "input_ids")


def _item_samples(name: str, item: Any, tokenizer: Any, method: str) -> list[Sample]:
    import torch

    if isinstance(item, Sample):  # already checked (the CLI reads files before the model loads)
        return [item]
    mask = None
    if isinstance(item, str):
        if tokenizer is None:
            raise _error(
                name,
                item,
                f"{method} calibration texts need a tokenizer: pass token ids instead "
                "(tokenizer(texts)['input_ids']), or a tokenizer where the backend takes one",
            )
        encoded = tokenizer(item, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded.get("attention_mask")
    elif isinstance(item, Mapping):
        if "input_ids" not in item:
            raise _error(name, item, "a dict sample needs 'input_ids' (and may have 'attention_mask')")
        ids, mask = item["input_ids"], item.get("attention_mask")
    elif hasattr(item, "input_ids"):
        ids, mask = item.input_ids, getattr(item, "attention_mask", None)
    else:
        ids = item
    ids = _as_ids(name, ids)
    if mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(mask)
        if mask.numel() != ids.numel():
            raise _error(
                f"{name}.attention_mask", tuple(mask.shape), f"must match input_ids' shape {tuple(ids.shape)}"
            )
        mask = mask.reshape(ids.shape).long()
    rows = []
    for row in range(ids.shape[0]):
        where = f"{name}[{row}]" if ids.shape[0] > 1 else name
        if ids.shape[1] == 0:
            raise _error(where, [], "expected a non-empty sample of token ids")
        rows.append(Sample(ids[row].contiguous(), mask[row].contiguous()))
    return rows


def _as_ids(name: str, ids: Any) -> torch.Tensor:
    """``ids`` as an int64 ``[rows, seq]`` tensor, or an error naming ``name``."""
    import torch

    try:
        tensor = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _error(name, ids, f"expected {_WHAT}") from exc
    if tensor.numel() == 0:  # before the dtype: torch reads [] as float32
        raise _error(name, [], "expected a non-empty sample of token ids")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise _error(name, tensor.dtype, "token ids must be integers")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise _error(name, tuple(tensor.shape), "expected token ids of shape [seq] or [samples, seq]")
    return tensor.long()


def padded_batches(
    samples: Sequence[Sample], *, batch_size: int = 1, pad_token_id: int | None = None, max_length: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """``{"input_ids", "attention_mask"}`` batches of ``batch_size`` samples for a model's forward.

    Each sample is cut to ``max_length`` tokens; shorter samples of a batch are right-padded with
    ``pad_token_id`` (0 when ``None``) and a zero mask.
    """
    import torch

    cut = [(s.input_ids[:max_length], s.attention_mask[:max_length]) if max_length else
           (s.input_ids, s.attention_mask) for s in samples]
    batches = []
    pad = 0 if pad_token_id is None else pad_token_id
    for start in range(0, len(cut), max(1, batch_size)):
        chunk = cut[start : start + max(1, batch_size)]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, (sample_ids, sample_mask) in enumerate(chunk):
            ids[row, : len(sample_ids)] = sample_ids
            mask[row, : len(sample_mask)] = sample_mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def token_blocks(samples: Sequence[Sample], *, max_block: int = 512) -> torch.Tensor:
    """The samples as one LongTensor ``[rows, seq]`` of real tokens (masked-out padding dropped).

    Samples of one length are stacked as they are. Samples of different lengths are joined into
    one stream and cut into blocks of ``min(max_block, total)`` tokens, the remainder dropped (what
    autoawq does with its ``max_calib_seq_len``).
    """
    import torch

    rows = [s.input_ids[s.attention_mask.bool()] for s in samples]
    rows = [r for r in rows if r.numel()]
    if not rows:
        raise _error("calibration", [], "every sample is all padding (attention_mask 0)")
    if len({len(r) for r in rows}) == 1:
        return torch.stack(rows)
    stream = torch.cat(rows)
    block = min(max_block, len(stream))
    return stream[: len(stream) // block * block].view(-1, block)


def read_file(path: str | os.PathLike[str]) -> Any:
    """The samples in a calibration file: a LongTensor, token-id lists or texts.

    * ``.safetensors``: an integer tensor named ``input_ids`` (or the file's only tensor);
    * ``.json``: a list of token-id lists, or a list of strings;
    * ``.jsonl``: one sample a line: a token-id list, a string, or ``{"text": ...}`` /
      ``{"input_ids": ...}``;
    * anything else: plain UTF-8 text, one sample per non-empty line.

    :raises QuantConfigError: the file is missing, unreadable, malformed or holds no sample,
        naming the file (and the line).
    """
    path = Path(path)
    field = f"calibration file {path}"
    if not path.is_file():
        raise QuantConfigError(f"{field}: no such file", field="calibration", value=str(path))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise QuantConfigError(f"{field}: cannot read: {exc}", field="calibration", value=str(path)) from exc
        tensor = tensors.get("input_ids", next(iter(tensors.values())) if len(tensors) == 1 else None)
        if tensor is None or tensor.is_floating_point() or tensor.dtype.is_complex:
            raise QuantConfigError(
                f"{field}: expected an integer tensor named 'input_ids' (found {sorted(tensors)})",
                field="calibration", value=str(path),
            )
        return tensor.long()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantConfigError(f"{field}: cannot read: {exc}", field="calibration", value=str(path)) from exc
    if suffix == ".json":
        try:
            samples = json.loads(text)
        except ValueError as exc:
            raise QuantConfigError(f"{field}: not valid JSON: {exc}", field="calibration", value=str(path)) from exc
        if not isinstance(samples, list):
            raise QuantConfigError(
                f"{field}: expected a JSON list of token-id lists or of strings, found a {type(samples).__name__}",
                field="calibration", value=str(path),
            )
    elif suffix == ".jsonl":
        samples = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise QuantConfigError(
                    f"{field}:{number}: not valid JSON: {exc}", field="calibration", value=str(path)
                ) from exc
            if isinstance(item, dict):
                if "input_ids" not in item and "text" not in item:
                    raise QuantConfigError(
                        f"{field}:{number}: an object needs 'input_ids' or 'text' (found {sorted(item)})",
                        field="calibration", value=str(path),
                    )
                item = item.get("input_ids", item.get("text"))
            samples.append(item)
    else:
        samples = [line for line in text.splitlines() if line.strip()]
    if not samples:
        raise QuantConfigError(f"{field}: no samples", field="calibration", value=str(path))
    return samples


def holds_texts(calibration: Any) -> bool:
    """Whether ``calibration`` (as :func:`read_file` returns it, or as given) holds texts."""
    if isinstance(calibration, str):
        return True
    return isinstance(calibration, list) and any(isinstance(item, str) for item in calibration)
