"""params.yaml read as YAML: bounded, UTF-8, each key given once, every failure in one line;
overrides merged into it key by key."""

from collections.abc import Hashable

import yaml

from transfer_study.core.stage import ParamsError, shown

MAX_PARAMS_BYTES = 1 << 20  # 1 MiB: params.yaml is a page of settings, not data


def yaml_problem(error):
    """A YAML parser's error in one line, keeping its position (line and column count from 1);
    also for what the parser lets through: an integer Python will not convert, deep nesting."""
    if isinstance(error, RecursionError):
        return "lists or mappings nested too deep to read"
    if isinstance(error, ValueError):  # Python converts integers of at most 4300 digits
        return "an integer too long to read"
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(problem or error).split()) or type(error).__name__


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    value, while DVC refuses the file, so a stage would run with a value DVC never recorded."""

    def construct_mapping(self, node, deep=False):
        lines = {}  # key -> the line it is first given on
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue
            line = key_node.start_mark.line + 1
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {shown(key)} given twice, on lines {lines[key]} and {line}",
                    problem_mark=key_node.start_mark,
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_params(path="params.yaml"):
    """params.yaml as YAML read it, not yet validated; unreadable, too large or not YAML: one
    line."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PARAMS_BYTES + 1)
    except OSError as error:
        raise ParamsError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path} is larger than {MAX_PARAMS_BYTES >> 20} MiB; is it params.yaml?")
    try:
        return yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise ParamsError(f"{path} is not valid YAML: {yaml_problem(error)}") from None


def deep_merge(base, overrides):
    """`base` with `overrides` applied key by key, recursively into mappings."""
    if not isinstance(base, dict) or not isinstance(overrides, dict):
        return overrides
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(base.get(key), value) if key in base else value
    return merged
