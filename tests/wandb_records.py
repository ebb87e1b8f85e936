"""Read what an offline W&B run wrote to its transaction log (``run-<id>.wandb``), for tests.

``wandb`` (0.18+, whose Go ``wandb-core`` writes the file) ships no Python reader for it any more, so this
is a small, strict one. Layout, as in wandb's ``core/pkg/leveldb/record.go`` and
``core/internal/transactionlog`` (a copy of LevelDB's log format, with a different checksum):

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (little-endian uint16), a version byte (0);
  the header sits at the start of the first 32 KiB block, so blocks stay aligned to file offsets;
* then 32 KiB blocks of chunks. Each chunk: a 7-byte header -- checksum (uint32 LE), payload length
  (uint16 LE), chunk type (uint8: FULL=1, FIRST=2, MIDDLE=3, LAST=4) -- then the payload. A chunk never
  crosses a block boundary; a block tail shorter than 7 bytes is zero padding;
* the checksum is plain zlib CRC-32 (IEEE, ``leveldb.CRCAlgoIEEE``, *not* LevelDB's masked CRC-32C),
  computed over the type byte followed by the payload;
* a record is one FULL chunk or FIRST, MIDDLE*, LAST; its payload is a serialized
  ``wandb.proto.wandb_internal_pb2.Record``.

Every chunk's checksum is verified; any corruption raises :class:`WandbChecksumError` /
:class:`WandbRecordsError`.

What an offline run writes there (wandb 0.31), as seen in the tests:

* ``run.log_artifact(artifact, aliases=[...])`` -> an ``artifact`` record (name, type, JSON ``metadata``,
  sorted ``aliases`` including "latest", a ``manifest`` whose ``contents`` carry the file paths);
  a logged ``wandb.Table`` also makes one, of type ``run_table``, named ``run-<id>-<key>``;
* ``run.use_artifact(...)`` raises ``TypeError("Cannot use artifact when in offline mode.")`` and writes
  nothing, so :attr:`OfflineRun.used_artifacts` (``use_artifact`` records) is empty for offline runs;
* ``run.mark_preempting()`` -> an empty ``preempting`` record;
* ``run.finish(exit_code=n)`` -> an ``exit`` record (``exit_code`` 0 is the proto default);
* history/summary items carry ``nested_key`` paths: ``{"train/loss": 1}`` -> ``["train/loss"]``,
  ``{"a": {"b": 1}}`` -> ``["a", "b"]``, and a media object is flattened into its fields
  (``["img", "_type"]``, ``["img", "path"]``, ...).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from wandb.proto import wandb_internal_pb2

__all__ = [
    "WandbRecordsError", "WandbChecksumError", "Chunk", "iter_chunks", "read_records", "iter_records",
    "find_run_file", "find_run_files", "OfflineRun", "RunInfo", "LoggedArtifact",
]

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
SUPPORTED_VERSIONS = (0, 1)
HEADER_LEN = 7
BLOCK_LEN = 32 * 1024
CHUNK_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_CHUNK_NAMES = {FULL: "FULL", FIRST: "FIRST", MIDDLE: "MIDDLE", LAST: "LAST"}

IMAGE_TYPES = ("image-file", "images/separated")
TABLE_TYPES = ("table-file", "partitioned-table", "joined-table")


class WandbRecordsError(ValueError):
    """A .wandb file that is not a well-formed W&B transaction log."""


class WandbChecksumError(WandbRecordsError):
    """A chunk whose stored CRC-32 does not match its type byte and payload."""


# ----------------------------------------------------------------------------------------------------------------
# Low level: chunks and records


def _chunk_crc(chunk_type: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(bytes((chunk_type,)))) & 0xFFFFFFFF


@dataclass(frozen=True)
class Chunk:
    """One verified chunk: its file ``offset`` (of the 7-byte chunk header), ``type`` (1-4) and ``payload``."""

    offset: int
    type: int
    payload: bytes


def _check_header(data: bytes, name: str) -> int:
    if len(data) < HEADER_LEN:
        raise WandbRecordsError(f"{name}: {len(data)} bytes, too short for the 7-byte W&B header")
    ident, magic, version = struct.unpack_from("<4sHB", data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC:
        raise WandbRecordsError(
            f"{name}: not a W&B transaction log (header {data[:HEADER_LEN]!r}, "
            f"expected {HEADER_IDENT!r} + magic 0x{HEADER_MAGIC:04X} LE + version byte)")
    if version not in SUPPORTED_VERSIONS:
        raise WandbRecordsError(f"{name}: unsupported .wandb format version {version} "
                                f"(this reader knows {SUPPORTED_VERSIONS})")
    return version


def iter_chunks(data: bytes, name: str = "<bytes>") -> Iterator[Chunk]:
    """Yield the chunks of a whole .wandb file's bytes, checking the header, framing and every checksum."""
    _check_header(data, name)
    pos = HEADER_LEN
    while pos < len(data):
        block_left = BLOCK_LEN - pos % BLOCK_LEN
        if block_left < CHUNK_HEADER_LEN:  # block trailer: zero padding
            if any(data[pos:pos + block_left]):
                raise WandbRecordsError(f"{name}: non-zero block padding at offset {pos}")
            pos += block_left
            continue
        if pos + CHUNK_HEADER_LEN > len(data):
            raise WandbRecordsError(f"{name}: truncated chunk header at offset {pos} (file ends at {len(data)})")
        checksum, length, chunk_type = struct.unpack_from("<IHB", data, pos)
        if checksum == 0 and length == 0 and chunk_type == 0:
            # A zeroed rest of block (wandb's Go reader skips these); insist that it is all zeros.
            end = min(pos + block_left, len(data))
            if any(data[pos:end]):
                raise WandbRecordsError(f"{name}: invalid all-zero chunk header at offset {pos}")
            pos = end
            continue
        if chunk_type not in _CHUNK_NAMES:
            raise WandbRecordsError(f"{name}: invalid chunk type {chunk_type} at offset {pos}")
        start, end = pos + CHUNK_HEADER_LEN, pos + CHUNK_HEADER_LEN + length
        if length > block_left - CHUNK_HEADER_LEN:
            raise WandbRecordsError(f"{name}: chunk at offset {pos} of length {length} overflows its block")
        if end > len(data):
            raise WandbRecordsError(f"{name}: truncated chunk at offset {pos}: needs {end} bytes, "
                                    f"file has {len(data)}")
        payload = data[start:end]
        actual = _chunk_crc(chunk_type, payload)
        if actual != checksum:
            raise WandbChecksumError(
                f"{name}: checksum mismatch in {_CHUNK_NAMES[chunk_type]} chunk at offset {pos} "
                f"(length {length}): stored 0x{checksum:08x}, computed 0x{actual:08x} -- the file is corrupted")
        yield Chunk(pos, chunk_type, payload)
        pos = end


def _iter_payloads(data: bytes, name: str) -> Iterator[bytes]:
    pending: list[bytes] | None = None  # pieces of a record being assembled (after its FIRST chunk)
    record_start = 0
    for chunk in iter_chunks(data, name):
        kind = _CHUNK_NAMES[chunk.type]
        if chunk.type in (FULL, FIRST):
            if pending is not None:
                raise WandbRecordsError(f"{name}: {kind} chunk at offset {chunk.offset} inside the record "
                                        f"that started at offset {record_start}")
            if chunk.type == FULL:
                yield chunk.payload
            else:
                pending, record_start = [chunk.payload], chunk.offset
        else:
            if pending is None:
                raise WandbRecordsError(f"{name}: {kind} chunk at offset {chunk.offset} without a FIRST chunk")
            pending.append(chunk.payload)
            if chunk.type == LAST:
                yield b"".join(pending)
                pending = None
    if pending is not None:
        raise WandbRecordsError(f"{name}: file ends inside the record that started at offset {record_start}")


def iter_records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """Yield the ``Record`` messages of a ``run-*.wandb`` file in order, verifying every chunk."""
    path = Path(path)
    data = path.read_bytes()
    for index, payload in enumerate(_iter_payloads(data, str(path))):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception as error:  # google.protobuf.message.DecodeError
            raise WandbRecordsError(f"{path}: record #{index} is not a wandb Record: {error}") from error
        yield record


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    """All ``Record`` messages of a ``run-*.wandb`` file, in order (checksums verified)."""
    return list(iter_records(path))


def find_run_files(wandb_dir: str | Path) -> list[Path]:
    """All ``<wandb_dir>/wandb/offline-run-*/run-*.wandb`` files, sorted."""
    return sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))


def find_run_file(wandb_dir: str | Path) -> Path:
    """The single offline run file under ``<wandb_dir>/wandb/offline-run-*/``; an error if none or several."""
    files = find_run_files(wandb_dir)
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {Path(wandb_dir) / 'wandb'} "
                                "(expected offline-run-*/run-*.wandb; was WANDB_MODE=offline and WANDB_DIR set?)")
    if len(files) > 1:
        listing = "\n  ".join(str(f) for f in files)
        raise WandbRecordsError(f"{len(files)} offline W&B runs under {Path(wandb_dir) / 'wandb'}, expected one "
                                f"(use find_run_files):\n  {listing}")
    return files[0]


# ----------------------------------------------------------------------------------------------------------------
# Decoding items (config / history / summary)


def _decode(value_json: str) -> Any:
    return json.loads(value_json) if value_json else None


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def _del_path(tree: dict, path: list[str]) -> None:
    node = tree
    for key in path[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


def _tree(items: Iterable[Any], tree: dict | None = None) -> dict:
    tree = {} if tree is None else tree
    for item in items:
        _set_path(tree, _item_path(item), _decode(item.value_json))
    return tree


def _is_media(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("_type"), str)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Join nested keys with "/"; a media object (a dict with a ``_type``) stays one dict value."""
    flat: dict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not _is_media(value):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _unwrap_config(config: dict) -> dict:
    """Undo config.yaml-style ``{"key": {"value": v, "desc": d}}`` wrapping, when every entry is wrapped."""
    entries = {k: v for k, v in config.items() if k != "_wandb"}
    wrapped = bool(entries) and all(
        isinstance(v, dict) and "value" in v and set(v) <= {"value", "desc"} for v in entries.values())
    return {k: v["value"] for k, v in entries.items()} if wrapped else entries


# ----------------------------------------------------------------------------------------------------------------
# Convenience view of one run


class RunInfo:
    """The run's ``RunRecord`` with friendlier names: ``group`` (``run_group``) and ``tags`` as a list.

    Any other attribute (``run_id``, ``display_name``, ``notes``, ``project``, ``entity``, ...) is the
    record's own; the raw message is ``.record``.
    """

    def __init__(self, record: wandb_internal_pb2.RunRecord):
        self.record = record

    @property
    def group(self) -> str:
        return self.record.run_group

    @property
    def tags(self) -> list[str]:
        return list(self.record.tags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.record, name)

    def __repr__(self) -> str:
        return (f"RunInfo(run_id={self.run_id!r}, project={self.project!r}, display_name={self.display_name!r}, "
                f"group={self.group!r}, tags={self.tags!r})")


@dataclass
class LoggedArtifact:
    """One ``artifact`` record: what ``run.log_artifact`` (or a logged Table) wrote."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict
    manifest_paths: list[str]
    digest: str = ""
    description: str = ""
    tags: list[str] = field(default_factory=list)
    record: wandb_internal_pb2.ArtifactRecord | None = field(default=None, repr=False)

    @classmethod
    def from_record(cls, record: wandb_internal_pb2.ArtifactRecord) -> "LoggedArtifact":
        metadata = json.loads(record.metadata) if record.metadata else {}
        return cls(name=record.name, type=record.type, aliases=list(record.aliases),
                   metadata=metadata if metadata is not None else {},
                   manifest_paths=[entry.path for entry in record.manifest.contents],
                   digest=record.digest, description=record.description, tags=list(record.tags),
                   record=record)


class OfflineRun:
    """Everything one offline run wrote, decoded.

    ``OfflineRun(path)``: ``path`` is a ``run-*.wandb`` file, an ``offline-run-*`` folder, or a ``WANDB_DIR``
    holding exactly one offline run.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            inside = sorted(path.glob("run-*.wandb"))
            if len(inside) == 1:
                path = inside[0]
            elif len(inside) > 1:
                raise WandbRecordsError(f"several run-*.wandb files in {path}: {[p.name for p in inside]}")
            else:
                path = find_run_file(path)
        self.path = path
        self.records: list[wandb_internal_pb2.Record] = read_records(path)

    @classmethod
    def from_wandb_dir(cls, wandb_dir: str | Path) -> "OfflineRun":
        return cls(find_run_file(wandb_dir))

    def records_of(self, kind: str) -> list[Any]:
        """The payloads of records of one kind (``"history"``, ``"artifact"``, ...; see ``Record``'s oneof)."""
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def kinds(self) -> list[str]:
        """The record kind of every record, in file order."""
        return [r.WhichOneof("record_type") or "" for r in self.records]

    # -- run ------------------------------------------------------------------------------------------------

    @property
    def run(self) -> RunInfo:
        runs = self.records_of("run")
        if not runs:
            raise WandbRecordsError(f"{self.path}: no run record")
        return RunInfo(runs[-1])

    @property
    def raw_config(self) -> dict:
        """The config as recorded: the run record's, then every ``config`` record's updates and removals."""
        config: dict = {}
        for run in self.records_of("run"):
            _tree(run.config.update, config)
            for item in run.config.remove:
                _del_path(config, _item_path(item))
        for record in self.records_of("config"):
            _tree(record.update, config)
            for item in record.remove:
                _del_path(config, _item_path(item))
        return config

    @property
    def config(self) -> dict:
        """The user's config (as passed to ``wandb.init`` / ``config.update``), without wandb's ``_wandb``."""
        return _unwrap_config(self.raw_config)

    # -- metrics --------------------------------------------------------------------------------------------

    @property
    def history(self) -> list[dict]:
        """One dict per ``run.log`` step; nested keys joined with "/", media objects kept as dicts."""
        rows = []
        for record in self.records_of("history"):
            row = _flatten(_tree(record.item))
            if "_step" not in row and record.HasField("step"):
                row["_step"] = record.step.num
            rows.append(row)
        return rows

    @property
    def summary_tree(self) -> dict:
        """The final summary as a nested dict (``summary_tree["a"]["b"]``)."""
        tree: dict = {}
        for record in self.records_of("summary"):
            _tree(record.update, tree)
            for item in record.remove:
                _del_path(tree, _item_path(item))
        return tree

    @property
    def summary(self) -> dict:
        """The final summary, keyed like :attr:`history` (nested keys joined with "/")."""
        return _flatten(self.summary_tree)

    def media_keys(self, types: Iterable[str]) -> list[str]:
        """Sorted keys of history or summary values that are media objects of the given ``_type``s."""
        types = set(types)
        keys = set()
        for row in [*self.history, self.summary]:
            keys.update(k for k, v in row.items() if _is_media(v) and v["_type"] in types)
        return sorted(keys)

    @property
    def images(self) -> list[str]:
        """Keys whose values are ``wandb.Image``s (``_type`` "image-file", or "images/separated" for lists)."""
        return self.media_keys(IMAGE_TYPES)

    @property
    def tables(self) -> list[str]:
        """Keys whose values are ``wandb.Table``s."""
        return self.media_keys(TABLE_TYPES)

    # -- artifacts, files, end of run -----------------------------------------------------------------------

    @property
    def artifacts(self) -> list[LoggedArtifact]:
        """Every ``artifact`` record (``log_artifact``; logged Tables add ``run_table`` ones), in order."""
        return [LoggedArtifact.from_record(a) for a in self.records_of("artifact")]

    def artifact(self, name: str) -> LoggedArtifact:
        """The last logged artifact called ``name``."""
        found = [a for a in self.artifacts if a.name == name]
        if not found:
            raise KeyError(f"no artifact {name!r} logged; logged: {[a.name for a in self.artifacts]}")
        return found[-1]

    @property
    def used_artifacts(self) -> list[wandb_internal_pb2.UseArtifactRecord]:
        """``use_artifact`` records (``id``, ``type``, ``name``, ``partial``); offline runs write none."""
        return self.records_of("use_artifact")

    @property
    def files(self) -> list[str]:
        """Paths of ``files`` records (saved files, media, requirements.txt...), first appearance order."""
        paths: dict[str, None] = {}
        for record in self.records_of("files"):
            for f in record.files:
                paths.setdefault(f.path, None)
        return list(paths)

    @property
    def exit_code(self) -> int | None:
        """The exit code of the last ``exit`` record; ``None`` if the run never finished."""
        exits = self.records_of("exit")
        return exits[-1].exit_code if exits else None

    @property
    def finished(self) -> bool:
        return bool(self.records_of("exit"))

    @property
    def preempting(self) -> bool:
        """Whether ``run.mark_preempting()`` was called (a ``preempting`` record)."""
        return bool(self.records_of("preempting"))

    def __repr__(self) -> str:
        return f"OfflineRun({str(self.path)!r}, {len(self.records)} records)"
