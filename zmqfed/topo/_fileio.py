"""Reading, checking and writing topology files (JSON, or YAML by suffix).

Only the shape of the data is checked here, naming the bad entry; nick names,
addresses and the graph are checked by ``zmqfed.topo.graph``. See that
module's docstring for the file format.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from zmqfed.errors import TopologyError

__all__ = ["is_yaml", "parse", "read", "write"]

_TOP_KEYS = frozenset({"nodes", "edges"})
_NODE_KEYS = frozenset({"nick_name", "address", "settings"})
_EDGE_KEYS = frozenset({"start", "end"})

NodeEntry = tuple[Any, Any, Any]
"""(nick name, endpoint / address dict / None, settings or None), still unchecked."""
_ADDRESS_KEYS = frozenset(
    {"endpoint", "world_size", "backend", "init_method", "rank", "group_name"}
)


def is_yaml(path: str | os.PathLike[str]) -> bool:
    """True when the file name asks for YAML."""
    return Path(path).suffix.lower() in (".yaml", ".yml")


def _yaml() -> Any:
    """Import PyYAML or explain how to get it."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is installed in the test env
        raise ImportError(
            "reading or writing YAML topology files needs PyYAML: pip install pyyaml "
            "(or use a .json file)"
        ) from exc
    return yaml


class _AliasRefused(TopologyError):
    """A YAML document uses an anchor or an alias (the file name is added by :func:`read`)."""


_loaders: dict[str, type] = {}


def _yaml_classes() -> tuple[type, type]:
    """A safe loader that refuses anchors and aliases, and a dumper that writes none.

    A topology needs neither, and aliases let a few hundred bytes stand for
    exponentially many nodes: a 647-byte file nesting them kept ``zmqfed-topo
    check`` busy for 26 s, ten times longer per level (docs/topology-format.md).
    Refusing them as they are parsed costs nothing on ordinary files.
    """
    if not _loaders:
        yaml = _yaml()

        class NoAliasLoader(yaml.SafeLoader):  # type: ignore[name-defined]
            def compose_node(self, parent: Any, index: Any) -> Any:
                event = self.peek_event()
                if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                    what = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
                    raise _AliasRefused(
                        f"YAML anchors and aliases are not allowed in a topology "
                        f"({what}{event.anchor} at line {event.start_mark.line + 1})"
                    )
                return super().compose_node(parent, index)

        class NoAliasDumper(yaml.SafeDumper):  # type: ignore[name-defined]
            def ignore_aliases(self, data: Any) -> bool:
                return True

        _loaders["load"], _loaders["dump"] = NoAliasLoader, NoAliasDumper
    return _loaders["load"], _loaders["dump"]


def _unknown(keys: Any, allowed: frozenset[str], where: str) -> None:
    """Reject keys outside ``allowed``, naming the first one."""
    extra = sorted(str(k) for k in keys if k not in allowed)
    if extra:
        raise TopologyError(
            f"{where} has the unknown key {extra[0]!r} (expected {sorted(allowed)})"
        )


def _list(data: dict[str, Any], key: str) -> list[Any]:
    """``data[key]`` as a list; missing or null means empty."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise TopologyError(f"{key!r} must be a list, got {type(value).__name__}")
    return value


def _node(index: int, entry: object) -> NodeEntry:
    """Check one entry of ``nodes``."""
    where = f"nodes[{index}]"
    if not isinstance(entry, dict):
        raise TopologyError(f"{where} must be an object, got {type(entry).__name__} {entry!r}")
    if "nick_name" not in entry:
        raise TopologyError(f"{where} has no 'nick_name'")
    where = f"{where} ({entry['nick_name']!r})"
    _unknown(entry, _NODE_KEYS, where)
    address = entry.get("address")
    if isinstance(address, dict):  # Address.serialize() form, read by Address.unserialize
        _unknown(address, _ADDRESS_KEYS, f"{where} address")
    elif address is not None and not isinstance(address, str):
        raise TopologyError(
            f"{where} address must be an endpoint string, an address object or null, "
            f"got {type(address).__name__}"
        )
    settings = entry.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise TopologyError(f"{where} settings must be an object, got {type(settings).__name__}")
    return (entry["nick_name"], address, settings)


def _edge(index: int, entry: object) -> tuple[str, str]:
    """Check one entry of ``edges``."""
    where = f"edges[{index}]"
    if isinstance(entry, dict):
        _unknown(entry, _EDGE_KEYS, where)
        for key in ("start", "end"):
            if key not in entry:
                raise TopologyError(f"{where} has no {key!r}")
        start, end = entry["start"], entry["end"]
        # OpenFed wrote each end as a whole node object
        start = start.get("nick_name", start) if isinstance(start, dict) else start
        end = end.get("nick_name", end) if isinstance(end, dict) else end
    elif isinstance(entry, (list, tuple)) and len(entry) == 2:
        start, end = entry
    else:
        raise TopologyError(
            f"{where} must be {{'start': name, 'end': name}} or [start, end], got {entry!r}"
        )
    for key, value in (("start", start), ("end", end)):
        if not isinstance(value, str):
            raise TopologyError(
                f"{where} {key} must be a nick name string, got {type(value).__name__} {value!r}"
            )
    return (start, end)


def parse(data: object) -> tuple[list[NodeEntry], list[tuple[str, str]]]:
    """Check the shape of a topology document; return its node and edge entries."""
    if not isinstance(data, dict):
        raise TopologyError(
            f"a topology must be an object with 'nodes' and 'edges', got {type(data).__name__}"
        )
    _unknown(data, _TOP_KEYS, "the topology")
    nodes = [_node(i, e) for i, e in enumerate(_list(data, "nodes"))]
    edges = [_edge(i, e) for i, e in enumerate(_list(data, "edges"))]
    return nodes, edges


def read(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON or YAML file into plain data."""
    name = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"{name}: cannot read the topology file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{name}: not UTF-8 text ({exc.reason})") from exc
    if is_yaml(path):
        yaml = _yaml()
        loader, _ = _yaml_classes()
        try:
            return yaml.load(text, Loader=loader)  # a SafeLoader subclass
        except _AliasRefused as exc:
            raise TopologyError(f"{name}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise TopologyError(f"{name}: not valid YAML ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TopologyError(f"{name}: not valid JSON ({exc})") from exc


def write(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` atomically (temporary file + rename) as JSON or YAML."""
    if is_yaml(path):
        _, dumper = _yaml_classes()
        text = _yaml().dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True)
    else:
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a topology is not a secret
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
