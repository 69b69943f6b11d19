"""Command-line options generated from typed settings groups: one pydantic field is one flag.

A field's type gives the flag's parser (a ``Literal`` its choices, ``bool`` a ``--x/--no-x`` switch, a list a
repeatable flag, ``Optional`` the word ``none``), its default and description give the help, so a flag reads and
means the same in every command that takes it. ``Config``'s settings are layered over a preset and a YAML file:
their flags default to "not given" (``setting_<key>`` in the parsed arguments) and ``group_values`` returns only
those given. Every other group's flags carry the field's default. Extra keys a field may carry
(``json_schema_extra``): ``aliases`` (earlier spellings), ``positional``, ``metavar``, ``const`` (the value of a
flag given without one), ``found`` (what ``--help`` names as the default when the command finds it), ``choices`` (a mapping of each choice to its one-line description, listed in ``--help``).
"""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from .config import Config

SETTING = "setting_"  # where Config's settings land in the parsed arguments, apart from a command's own options


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _fields(group) -> dict:
    return group.__pydantic_fields__


def _dest(group, key: str) -> str:
    return SETTING + key if group is Config else key


def add_group(
    parser: argparse.ArgumentParser,
    group,
    *,
    keys=None,
    title: str | None = None,
    required=(),
    shown_defaults: dict | None = None,
) -> None:
    """A flag for each field of ``group`` (a pydantic model or ``Config``), or of those named in ``keys``.

    ``required`` names fields the command cannot do without; ``shown_defaults`` replaces the default ``--help``
    shows for a field whose default this command sets itself."""
    fields = {k: v for k, v in _fields(group).items() if keys is None or k in keys}
    listed = [_choice_lines(k, info) for k, info in fields.items() if (info.json_schema_extra or {}).get("choices")]
    # a group's title is the first line of its docstring (an option group of the command's --help)
    title = title or (group.__doc__ or "").strip().split("\n")[0].strip().rstrip(":") or None
    options = parser.add_argument_group(title, "\n".join(listed) or None)
    for key, info in fields.items():
        shown = (shown_defaults or {}).get(key, (info.json_schema_extra or {}).get("found", _default(info)))
        _add(options, group, key, info, key in required or info.is_required(), shown)


def _choice_lines(key: str, info) -> str:
    lines = [f"{flag(key)} choices:"]
    lines += [f"  {name:<10} {line}" for name, line in info.json_schema_extra["choices"].items()]
    return "\n".join(lines)


def _default(info) -> Any:
    return None if info.is_required() else info.get_default(call_default_factory=True)


def _add(options, group, key: str, info, required: bool, shown: Any) -> None:
    extra = info.json_schema_extra or {}
    parse, choices, kind = converter(info.annotation)
    if extra.get("positional"):
        options.add_argument(key, type=parse, nargs="+" if kind == "list" else None, help=info.description)
        return
    help_ = info.description or ""
    if not required and kind != "secret":
        help_ += f" (default: {_default_text(shown)})"
    names = (flag(key), *extra.get("aliases", ()))
    # Config's flags default to "not given", so that a preset or a YAML file below them shows through
    default = None if group is Config or kind == "list" else _default(info)
    common = {"dest": _dest(group, key), "help": help_, "default": default}
    if kind == "switch":
        options.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        return
    if "const" in extra:  # given without a value: the const
        common.update(nargs="?", const=extra["const"])
    options.add_argument(
        *names,
        type=parse,
        choices=choices,
        required=required,
        action="append" if kind == "list" else "store",  # a list: the flag repeated
        metavar=None if choices else extra.get("metavar", key.upper()),
        **common,
    )


def converter(annotation) -> tuple[Any, list | None, str]:
    """(argparse type, choices, kind: value | switch | list | secret) for a declared type; the model checks ranges."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return converter(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation)), "value"
    if origin is list:
        return converter(typing.get_args(annotation)[0])[0], None, "list"
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) > 1:
            if list[int] not in args:
                raise TypeError(f"no flag parser for {annotation}: give the field one type, or Optional of one")
            return devices, None, "value"  # a number, a list or a word
        inner, choices, kind = converter(args[0])
        if kind != "value":
            return inner, choices, kind

        def optional(text: str, inner=inner):
            return None if text.strip().lower() in ("none", "null", "") else inner(text)

        optional.__name__ = getattr(inner, "__name__", "value")
        return optional, choices, kind
    if annotation is bool:
        return None, None, "switch"
    if annotation is SecretStr:
        return str, None, "secret"
    if annotation is dict:
        return yaml_mapping, None, "value"
    return annotation, None, "value"


def devices(text: str):
    """``--devices``: a number, a list of device indices (0,1) or ``auto``, the same in every command."""
    if text.strip() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, a list such as 0,1, or auto; got {text!r}") from None


def yaml_mapping(text: str) -> dict:
    import yaml

    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as {{key: value}}, got {text!r}")
    return value


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def group_values(args: argparse.Namespace, group) -> dict:
    """The values of ``group``'s fields in the parsed arguments, checked against their declared types.

    ``Config``: only the settings given (those left out stay with the preset, the YAML file or the default), as
    given. Any other group: every field the command took, converted. A value out of range is a ``ValueError``
    naming its flag and key."""
    given = vars(args)
    if group is Config:
        values = {k: given[_dest(group, k)] for k in _fields(group) if given.get(_dest(group, k)) is not None}
        Config.from_dict(values, source="command line")  # only the given ones: each default passes every check
        return values
    taken = [k for k in _fields(group) if k in given]
    values = {k: given[k] for k in taken if given[k] is not None}  # a repeatable flag never given: its default
    try:
        checked = group.model_validate(values) if issubclass(group, BaseModel) else group(**values)
    except ValidationError as err:
        raise ValueError("; ".join(_explain(e) for e in err.errors())) from None
    return {k: getattr(checked, k) for k in taken}


def _explain(error: dict) -> str:
    key = str(error["loc"][0]) if error["loc"] else "options"
    return f"{flag(key)} ({key}={error.get('input')!r}): {error['msg']}"
