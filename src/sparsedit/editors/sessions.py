"""Sessions that outlive the process: `save`/`load` of a whole editing session, `SparseEditor`'s and `GANEditor`'s
(issues 17, 34).

A saved session is a directory: `tensors-<digest>.safetensors` (every cached tensor, the capture's trajectory, images,
embeddings and generator state) and `session.json` (the keys, the capture's arguments, the editor's config, a content
fingerprint of every model component and the scheduler, the tensors file's SHA-256 and size, and a SHA-256 of the
manifest itself). A save is all-or-nothing: the tensors go to a new file named by its digest, then the manifest is
written to a temporary file and renamed over `session.json` (the commit point), then files of earlier saves are
removed; a save killed at any point leaves the previous session loadable. Loading verifies both digests and the
safetensors header before using anything (`CorruptSessionError` says what does not match), checks the fingerprint
against the pipeline it is given (`StaleCacheError` names what differs) and memory-maps the tensors copy-on-write:
the file is never written, and pages are read as edits touch them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import secrets
from pathlib import Path

import torch

from ..cache import StaleCacheError
from ..config import SparseConfig, TemporalConfig, TextEditConfig
from ..fingerprints import (
    content_fingerprint,
    file_digest,
    manifest_digest,
    pipeline_fingerprint,
    text_fingerprint,
    weights_checksum,
)
from ..nn.state import LayerRecord
from ..spatial import export_capture, restore_capture


__all__ = ["CorruptSessionError", "load_capture", "load_editor", "load_gan", "read_tensors", "save_editor", "save_gan"]

FORMAT = 2  # 2: digests of the manifest and the tensors file, the calibration (issue 34)
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                       torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                       torch.bool)}  # fmt: skip
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}  # fmt: skip


def _compare(saved: dict, now: dict) -> None:
    diffs = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise StaleCacheError(
            f"the saved session was captured with another {', '.join(diffs)} than this pipeline has "
            f"({'; '.join(f'{k}: saved {str(saved.get(k))[:60]!r}, now {str(now.get(k))[:60]!r}' for k in diffs)}). "
            "Load it on the pipeline it was saved from, or capture again."
        )


# -- save -----------------------------------------------------------------------------------------------------------
class _Writer:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, t: torch.Tensor) -> dict:
        """Store `t` with its layout (a channels-last map as NHWC bytes, as the cache holds it); returns how to rebuild
        it (`_tensor`)."""
        t = t.detach().cpu()
        nhwc = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        self.tensors[name] = (t.permute(0, 2, 3, 1) if nhwc else t).contiguous()
        return {"tensor": name, "nhwc": nhwc}

    def plain(self, name: str, t: torch.Tensor | None) -> str | None:
        """Store `t` in the default layout; returns its name (`None` for no tensor)."""
        if t is None:
            return None
        self.tensors[name] = t.detach().cpu().contiguous()
        return name

    def write(self, path: Path, manifest: dict) -> None:
        """The session directory, committed atomically: the tensors file under a name of its own, then the manifest
        (which names it and carries its digest) renamed over `session.json`, then the files of earlier saves go."""
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".tensors-{secrets.token_hex(6)}.tmp"
        try:
            save_file(self.tensors, str(tmp))
            _fsync(tmp)
            digest, size = file_digest(tmp), tmp.stat().st_size
            name = f"tensors-{digest[:16]}.safetensors"
            os.replace(tmp, path / name)
            manifest = {**manifest, "files": {"tensors": {"name": name, "sha256": digest, "bytes": size}}}
            text = json.dumps(manifest, indent=1, default=_json_default)
            manifest = json.loads(text)  # as it will be read back (tuples as lists), for the digest
            manifest["digest"] = manifest_digest(manifest)
            _commit_text(path / "session.json", json.dumps(manifest, indent=1))
        finally:
            tmp.unlink(missing_ok=True)
        for old in [*path.glob("tensors*.safetensors"), *path.glob(".tensors-*.tmp")]:
            if old.name != name:
                old.unlink(missing_ok=True)


class CorruptSessionError(ValueError):
    """A saved session whose files do not match their digests or their own description: truncated, overwritten,
    edited by hand, or half-written by an older version. Nothing of it is used."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_text(path: Path, text: str) -> None:
    """Write `path` all or nothing: a temporary file, flushed to disk, renamed over it, the directory flushed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        _fsync(path.parent)


def _value(w: _Writer, name: str, v):
    """A JSON description of an input value: tensors go to the file."""
    if isinstance(v, torch.Tensor):
        return {"tensor": w.add(name, v)}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _value(w, f"{name}/{k}", x) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"json": v}
    raise NotImplementedError(f"this session holds an input of type {type(v).__name__} ({name}) that cannot be saved.")


def _save_model(w: _Writer, part: str, model) -> dict:
    saved = export_capture(model)
    cache = saved["cache"]
    entries = []
    for i, (key, fields) in enumerate(cache.export()):
        out = {}
        for field, (t, home_dtype, home_device, scale) in fields.items():
            out[field] = {**w.add(f"{part}/{i}/{field}", t), "home_dtype": str(home_dtype).removeprefix("torch."),
                          "home_device": str(home_device)}  # fmt: skip
            if scale is not None:
                out[field]["scale"] = w.add(f"{part}/{i}/{field}@scale", scale)
        entries.append({"key": list(key), "fields": out})
    aux = [
        {"scope": list(sc), "values": {k: _value(w, f"{part}/aux/{j}/{k}", v) for k, v in vals.items()}}
        for j, (sc, vals) in enumerate(saved["aux"].items())
    ]
    return {
        "entries": entries,
        "aux": aux,
        "spatial_inputs": saved["spatial_inputs"],
        "storage_dtype": None if cache.storage_dtype is None else str(cache.storage_dtype).removeprefix("torch."),
        "records": [vars(r) for r in saved["records"]],
        "capture_records": [vars(r) for r in saved["capture_records"]],
        "output_format": "channels_last" if saved["output_format"] == torch.channels_last else "contiguous",
        "calibration": saved["calibration"],
    }


def save_editor(editor, path) -> None:
    cap = editor.current
    if cap is None:
        raise RuntimeError("nothing to save: call `editor.capture(...)` first.")
    try:
        json.dumps(cap.call)
    except TypeError:
        raise NotImplementedError(
            "this capture's arguments (e.g. a prompt given as embeddings) cannot be saved."
        ) from None
    w = _Writer()
    image = cap.image if isinstance(cap.image, torch.Tensor) else None  # text-to-image: (batch, height, width)
    capture = {
        "image": w.plain("capture/image", image),
        "batch_shape": None if image is not None else list(cap.image),
        "mask": w.plain("capture/mask", cap.mask),
        "trajectory": [w.plain(f"capture/trajectory/{i}", t) for i, t in enumerate(cap.trajectory)],
        "timesteps": w.plain("capture/timesteps", torch.stack([torch.as_tensor(t) for t in cap.timesteps])),
        "generator_state": w.plain("capture/generator_state", cap.generator_state),
        "generator_device": cap.generator_device,
        "call": cap.call,
        "embeds": w.plain("capture/embeds", cap.embeds),
        "latents": {k: w.plain(f"capture/latents/{k}", t) for k, t in cap.latents.items()},
        "inputs": {k: w.plain(f"capture/inputs/{k}", t) for k, t in cap.inputs.items()},
        "decoded": w.plain("capture/decoded", cap.decoded),
        "scheduler": list(cap.scheduler),
        "version": cap.version,
        "step_macs": cap.step_macs,
        "macs": cap.macs,
        "attention": None,
        "conditions": {k: w.plain(f"capture/conditions/{k}", t) for k, t in (cap.conditions or {}).items()},
    }
    if cap.attention is not None:
        att = cap.attention
        capture["attention"] = {
            "size": list(att["size"]),
            "version": att["version"],
            "maps": {str(i): w.plain(f"capture/attention/maps/{i}", t) for i, t in att["maps"].items()},
            "probs": [
                {"key": list(k), "tensor": w.plain(f"capture/attention/probs/{j}", t)}
                for j, (k, t) in enumerate(att["probs"].items())
            ],
        }
    w.write(Path(path), {
        "format": FORMAT,
        "editor": type(editor).__name__,
        "kind": editor.kind,
        "config": editor.config.to_dict(),
        "text_config": editor.text_config.to_dict(),
        # Temporal reuse keeps no state between runs (a run's reused features come from its own key steps), so its
        # config is all a session needs to edit as the original editor would.
        "temporal": None if editor.temporal is None else editor.temporal.to_dict(),
        "on_stale": editor.on_stale,
        "fingerprint": pipeline_fingerprint(editor.pipe),
        "capture": capture,
        "history": editor.history,
        "models": {part: _save_model(w, part, m) for part, m in editor.loop.models().items()},
    })  # fmt: skip


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).removeprefix("torch.")
    raise TypeError(f"cannot save {type(o).__name__}")


# -- load -----------------------------------------------------------------------------------------------------------
def read_tensors(path: Path, use_mmap: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its header checked against the file (`CorruptSessionError`). With
    `use_mmap`: views of a copy-on-write memory map of the file (writes stay in this process; the file is never
    changed)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(f.fileno()).st_size else b""
    header, start = _header(path, mm)
    if not use_mmap:
        mm = bytearray(mm)  # one private copy in memory
    base = torch.frombuffer(mm, dtype=torch.uint8) if len(mm) else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, (dtype, shape, begin, end) in header.items():
        raw = base[start + begin : start + end]
        if (start + begin) % dtype.itemsize:
            raw = raw.clone()  # misaligned for this dtype: a copy
        out[name] = raw.view(dtype).reshape(shape)
    return out


def _header(path: Path, mm) -> tuple[dict, int]:
    """The safetensors header of `mm`, checked: its length, every dtype, shape and offset inside the file, sizes
    matching shapes, no overlaps. Returns `{name: (dtype, shape, begin, end)}` and where the data starts."""

    def corrupt(why: str):
        return CorruptSessionError(f"{path} is not a valid safetensors file: {why}.")

    if len(mm) < 8:
        raise corrupt(f"{len(mm)} bytes, shorter than a header")
    n = int.from_bytes(mm[:8], "little")
    if n > len(mm) - 8:
        raise corrupt(f"its header claims {n} bytes, the file has {len(mm) - 8} after the length")
    try:
        raw = json.loads(bytes(mm[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"its header is not JSON ({e})") from None
    raw.pop("__metadata__", None)
    data = len(mm) - 8 - n
    out, spans = {}, []
    for name, info in raw.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has a malformed entry {str(info)[:80]}") from None
        count = 1
        for d in shape:
            count *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data or end - begin != count * dtype.itemsize:
            raise corrupt(f"tensor {name!r} ({info['dtype']} {shape}) has offsets {begin}..{end} outside its "
                          f"{data} data bytes or not of its size")  # fmt: skip
        out[name] = (dtype, shape, begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise corrupt(f"tensors {a!r} and {b!r} overlap")
    return out, 8 + n


def _tensor(tensors, ref: dict) -> torch.Tensor:
    t = tensors[ref["tensor"]]
    return t.permute(0, 3, 1, 2) if ref.get("nhwc") else t


def _restore_value(tensors, v, device):
    if "tensor" in v:
        return _tensor(tensors, v["tensor"]).to(device)
    if "dict" in v:
        return {k: _restore_value(tensors, x, device) for k, x in v["dict"].items()}
    return v["json"]


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def _load_model(tensors, saved: dict, model, config: SparseConfig) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    storage = None if saved["storage_dtype"] is None else _DTYPES[saved["storage_dtype"]]
    converts = storage is not None or config.cache_device is not None
    entries = []
    for e in saved["entries"]:
        fields = {}
        for field, ref in e["fields"].items():
            t = _tensor(tensors, ref)
            if t.device != device and not converts:
                t = t.to(device)
            scale = _tensor(tensors, ref["scale"]).clone() if "scale" in ref else None
            fields[field] = (t, _DTYPES[ref["home_dtype"]], device, scale)
        entries.append((_tuple(e["key"]), fields))
    aux = {
        _tuple(a["scope"]): {k: _restore_value(tensors, v, device) for k, v in a["values"].items()}
        for a in saved["aux"]
    }
    layout = torch.channels_last if saved["output_format"] == "channels_last" else torch.contiguous_format
    restore_capture(model, entries, aux, [_record(r) for r in saved["records"]],
                    [_record(r) for r in saved["capture_records"] or []], layout, saved["calibration"], storage,
                    saved.get("spatial_inputs", ()))  # fmt: skip


def _record(d: dict) -> LayerRecord:
    fields = {f.name for f in dataclasses.fields(LayerRecord)}
    d = {k: v for k, v in d.items() if k in fields}
    d["resolution"] = tuple(d["resolution"])
    return LayerRecord(**d)


def _read_manifest(path: Path, cls) -> dict:
    """`session.json` of a session saved by a `cls` editor, checked for its format and its digest."""
    manifest_path = path / "session.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no saved session at {path} (expected {manifest_path}); write one with editor.save()."
        )

    def corrupt(why: str):
        return CorruptSessionError(
            f"session {path} is corrupt or was modified: {why}. Nothing of it was used; load an intact copy, or "
            "capture again."
        )

    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"session.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise corrupt("session.json is not a JSON object")
    if manifest.get("format") == 1 and manifest.get("editor") == cls.__name__:
        raise CorruptSessionError(
            f"{path} was saved by an earlier sparsedit (session format 1), whose files carry no digests, so its "
            "integrity cannot be checked; capture again and save it with this version."
        )
    if manifest.get("format") != FORMAT or manifest.get("editor") != cls.__name__:
        raise ValueError(
            f"{path} is not a {cls.__name__} session of format {FORMAT} (it is a {manifest.get('editor')!r} session of "
            f"format {manifest.get('format')!r}); load it with the editor and sparsedit version that saved it."
        )
    if manifest.get("digest") != manifest_digest(manifest):
        raise corrupt("session.json does not match its digest (edited by hand, or damaged)")
    return manifest


def _tensors_path(path: Path, manifest: dict) -> Path:
    """The session's tensors file, verified against the size and SHA-256 the manifest recorded."""
    info = manifest["files"]["tensors"]
    name = info["name"]
    f = path / name
    if Path(name).name != name or not f.is_file():
        raise CorruptSessionError(f"session {path} is incomplete: its tensors file {name} is missing.")
    size = f.stat().st_size
    if size != info["bytes"]:
        raise CorruptSessionError(
            f"session {path} is corrupt: {name} has {size} bytes, {info['bytes']} were saved (truncated or "
            "overwritten). Nothing of it was used; load an intact copy, or capture again."
        )
    if file_digest(f) != info["sha256"]:
        raise CorruptSessionError(
            f"session {path} is corrupt: {name} does not match its SHA-256 (its bytes changed after saving). "
            "Nothing of it was used; load an intact copy, or capture again."
        )
    return f


def load_editor(cls, pipe, path):
    """A `cls` editor on `pipe` made as the saved session's was, after checking the pipeline against the saved
    fingerprint (`StaleCacheError` names what differs). `load_capture` then restores the session into it."""
    path = Path(path)
    manifest = _read_manifest(path, cls)
    if manifest["fingerprint"]["pipeline"] != type(pipe).__name__:
        raise StaleCacheError(
            f"the session was saved from a {manifest['fingerprint']['pipeline']}, not a {type(pipe).__name__}; load it "
            "on the same kind of pipeline."
        )
    temporal = manifest.get("temporal")
    editor = cls(pipe, SparseConfig.from_dict(manifest["config"]), on_stale=manifest["on_stale"],
                 text_config=TextEditConfig.from_dict(manifest["text_config"]),
                 temporal=None if temporal is None else TemporalConfig.from_dict(temporal))  # fmt: skip
    try:
        _compare(manifest["fingerprint"], pipeline_fingerprint(editor.pipe))
    except BaseException:
        editor.remove()
        raise
    return editor


def load_capture(editor, path, mmap: bool = True):
    """Restore the saved caches into `editor`'s models; returns the saved `Capture` and the edit history."""
    from .capture import Capture

    path = Path(path)
    manifest = _read_manifest(path, type(editor))
    tensors = read_tensors(_tensors_path(path, manifest), use_mmap=mmap)
    device = editor.unet.device
    for part, model in editor.loop.models().items():
        _load_model(tensors, manifest["models"][part], model, editor.config)
    c = manifest["capture"]

    def get(name):
        # A copy in freshly allocated (64-byte aligned) memory: a view of the memory map is aligned only to its dtype,
        # and CPU GEMMs round differently for differently aligned inputs (an SD3 session's pooled projections gave
        # an edit 2e-7 apart from the live editor's).
        return None if name is None else tensors[name].to(device).clone()

    attention = None
    if c["attention"] is not None:
        a = c["attention"]
        attention = {
            "size": tuple(a["size"]),
            "version": a["version"],
            "maps": {int(i): get(n) for i, n in a["maps"].items()},
            "probs": {_tuple(p["key"]): get(p["tensor"]) for p in a["probs"]},
        }
    ts = tensors[c["timesteps"]].to(device)
    capture = Capture(
        image=get(c["image"]) if c["image"] is not None else tuple(c["batch_shape"]),
        mask=get(c["mask"]),
        trajectory=[get(n) for n in c["trajectory"]],
        timesteps=list(ts),
        generator_state=tensors[c["generator_state"]].clone(),
        generator_device=c["generator_device"],
        call=c["call"],
        embeds=get(c["embeds"]),
        latents={k: get(n) for k, n in c["latents"].items()},
        inputs={k: get(n) for k, n in c.get("inputs", {}).items()},
        decoded=get(c["decoded"]),
        scheduler=tuple(c["scheduler"]),
        attention=attention,
        version=c["version"],
        step_macs=c["step_macs"],
        macs=c["macs"],
        conditions={k: get(n) for k, n in c.get("conditions", {}).items()},
        text_fingerprint=text_fingerprint(editor.pipe),  # checked against the saved content by load_editor
        checksums=weights_checksum(editor.loop.components()),  # the content was checked by load_editor
        batched_guidance=editor.adapter.batches_guidance,
    )
    return capture, list(manifest.get("history", []))


def save_gan(editor, path) -> None:
    current = editor.current
    if current is None:
        raise RuntimeError("nothing to save: call `editor.capture(labels)` first.")
    w = _Writer()
    w.write(Path(path), {
        "format": FORMAT,
        "editor": type(editor).__name__,
        "config": editor.config.to_dict(),
        "fingerprint": {"generator": content_fingerprint(editor.generator), "class": type(editor.generator).__name__},
        "input": w.plain("input", current[0]),
        "image": w.plain("image", current[1]),
        "models": {"generator": _save_model(w, "generator", editor.generator)},
    })  # fmt: skip


def load_gan(cls, generator, path, mmap: bool = True):
    """A `cls` editor on `generator` with the saved cache restored; returns it and the saved `(input, image)`."""
    path = Path(path)
    manifest = _read_manifest(path, cls)
    now = {"generator": content_fingerprint(generator), "class": type(generator).__name__}
    _compare(manifest["fingerprint"], now)
    editor = cls(generator, SparseConfig.from_dict(manifest["config"]))
    try:
        tensors = read_tensors(_tensors_path(path, manifest), use_mmap=mmap)
        device = next((p.device for p in generator.parameters()), torch.device("cpu"))
        _load_model(tensors, manifest["models"]["generator"], generator, editor.config)
        current = (tensors[manifest["input"]].to(device), tensors[manifest["image"]].to(device))
    except BaseException:
        editor.remove()
        raise
    return editor, current
