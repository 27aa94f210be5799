"""Reading a run config file, and one override value, as strict YAML: every problem is one RunConfigError.

Why apart from the settings themselves: this is the part that faces hostile input byte by byte (sizes, encodings,
alias bombs, duplicate keys), testable on its own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class RunConfigError(ValueError):
    """The run configuration (file or override) is invalid."""


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few hundred bytes; PyYAML would read any size into memory


class RunConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (``2e-4`` is a float, not the string YAML 1.1 makes it), made
    strict: no anchors or aliases (a kilobyte of nested aliases expands to gigabytes: the "billion laughs"), no
    duplicate keys (PyYAML keeps the last silently), and keys are strings."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "anchors and aliases (&name, *name) are not allowed in a run config",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise yaml.constructor.ConstructorError(
                        None, None, "merge keys (<<) are not allowed in a run config", key_node.start_mark
                    )
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"keys must be plain names, got {key_node.value!r}"[:200],
                        key_node.start_mark,
                    )
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}"[:200], key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own message spans several, with a snippet)."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def read_yaml(path: Path) -> Any:
    """Parse a run config file; every problem is a RunConfigError naming the file."""
    if not path.exists():
        raise RunConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise RunConfigError(f"config file {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise RunConfigError(f"{path}: {size} bytes, too large for a run config (at most {MAX_CONFIG_BYTES})")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RunConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): a run config is a YAML file"
        ) from None
    bad = next((i for i, c in enumerate(text) if c == "\x00"), None)
    if bad is not None:
        raise RunConfigError(
            f"{path}: binary data (a NUL character at offset {bad}): a run config is a YAML file"
        )
    try:
        return yaml.load(text, Loader=RunConfigLoader)
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise RunConfigError(f"{path}: nested too deeply to be a run config") from None


# A dot or an exponent, so plain integers stay ints; PyYAML's own float rule still handles .inf and .nan.
_FLOAT = re.compile(
    r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[0-9][0-9_]*[eE][-+]?[0-9]+)$""",
    re.X,
)
RunConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """One override value as users write it: ``2e-4`` and ``.5`` are floats, ``[q_proj, v_proj]`` a list."""
    try:
        return yaml.load(text, Loader=RunConfigLoader)
    except yaml.YAMLError as e:
        raise RunConfigError(
            f"cannot read the value {text[:200]!r}: {_yaml_problem(e)} (quote it to pass a string)"
        ) from None
    except RecursionError:
        raise RunConfigError(f"cannot read the value {text[:200]!r}: nested too deeply") from None
