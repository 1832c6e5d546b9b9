"""Options as dataclasses: defaults and help live on the fields; YAML and the command line fill them.

Every command declares its options as one or more dataclasses whose fields carry a help text
(`opt(default, "help")`). `parse_options` reads, in increasing priority: the field defaults, a
flat YAML file given with `--config FILE.yaml`, then `--name value` on the command line. A key that
no field declares is an error, in YAML (reported with its line) and on the command line alike, so
a typo never silently falls back to a default. Options are never abbreviated: `--learning_rat`
is an error that names `--learning_rate`, not a quiet synonym for it (a prefix that is unique
today becomes ambiguous, or means another option, as soon as an option is added).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from typing import Any

import yaml

from .errors import UserError

_MISSING = dataclasses.MISSING


def opt(default: Any, help: str, choices: tuple | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its help text (and, for strings, the allowed values)."""
    metadata = {"help": help, "choices": choices, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the underlying type, whether None is allowed) for annotations like `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _resolved_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def convert_value(name: str, value: Any, tp: Any, choices: tuple | None = None) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ValueError saying why."""
    base, optional = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in {"none", "null"} and optional):
        if optional:
            return None
        raise ValueError(f"{name} cannot be empty")
    origin = typing.get_origin(base)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept it as the number it obviously is.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} must be a string, got {value!r}")
        value = str(value)
        if choices and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(base) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [convert_value(name, v, item_type) for v in value]
    if origin is dict or base is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported option type {tp!r} for {name}")


def _yaml_with_lines(path: str) -> tuple[dict, dict[str, int]]:
    """Load a flat YAML mapping and remember the line of each key, for error messages."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror}).") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of option: value.")
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
    return data, lines


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _closest_flag(flag: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(flag, known, n=1)
    if close:
        return close[0]
    # Abbreviations used to be accepted, so an old command line may hold one: name what it meant.
    longer = [k for k in known if k.startswith(flag)]
    return longer[0] if len(longer) == 1 else None


def _unknown_argument(extra: list[str], known: list[str], prog: str) -> UserError:
    """The error for what argparse could not place: the first unknown --option, else a stray value."""
    flag = next((a for a in extra if a.startswith("-")), None)
    if flag is None:
        return UserError(f"unexpected argument {extra[0]!r}; options are written --name value "
                         f"(run {prog} --help for the list).")
    flag = flag.split("=", 1)[0]
    close = _closest_flag(flag, known)
    hint = f"did you mean {close}?" if close else f"run {prog} --help for the list of options."
    return UserError(f"unknown option {flag}; {hint}")


def _argument_error(error: argparse.ArgumentError, argv: list[str]) -> UserError:
    """argparse's complaint about one option's value, named by the flag the user typed."""
    flags = (error.argument_name or "").split("/")
    typed = next((f for f in reversed(argv) if f.split("=", 1)[0] in flags), flags[0])
    typed = typed.split("=", 1)[0]
    if error.message.startswith("expected one argument"):
        after = argv[argv.index(typed) + 1:argv.index(typed) + 2] if typed in argv else []
        hint = f" (write {typed}=VALUE for a value that starts with -)" if after and after[0].startswith("-") else ""
        return UserError(f"{typed} needs a value{hint}.")
    return UserError(f"{typed}: {error.message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        # argparse would print its usage text and exit; one line the user can act on is enough.
        raise UserError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def _str_to_bool(value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser(sections: list[type], prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, description=description, formatter_class=_HelpFormatter, argument_default=argparse.SUPPRESS,
        usage=f"{prog} [--config FILE.yaml] [--OPTION VALUE ...]", allow_abbrev=False, exit_on_error=False,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; the command line overrides it")
    for cls in sections:
        title = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
        group = parser.add_argument_group(title)
        for f, tp in _resolved_fields(cls):
            base, _ = _base_type(tp)
            default = f.default if f.default is not _MISSING else f.default_factory()
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_text += f" {{{', '.join(map(str, choices))}}}"
            shown = (",".join(map(str, default)) or "empty") if isinstance(default, list) else default
            help_text += f" (default: {shown})"
            help_text = help_text.replace("%", "%%")  # argparse formats help with %
            flags = [f"--{f.name}", *(f"--{a}" for a in f.metadata.get("aliases", ()))]
            if base is bool:
                group.add_argument(*flags, dest=f.name, nargs="?", const=True, type=_str_to_bool, metavar="BOOL", help=help_text)
            else:
                group.add_argument(*flags, dest=f.name, metavar=f.name.upper(), help=help_text)
    parser.flags = sorted(flag for action in parser._actions for flag in action.option_strings)
    return parser


def parse_options(sections: list[type], argv: list[str] | None = None, prog: str | None = None,
                  description: str = "", config_file: str | None = None,
                  ignored_sections: list[type] = (), yaml_sections: list[type] | None = None) -> list[Any]:
    """Return one instance per dataclass in `sections`, filled from defaults, YAML and argv.

    YAML keys of `ignored_sections` are accepted and skipped, and with `yaml_sections` only
    those sections take values from the YAML file: that is how one command reads another's
    config (prediction takes the model, template and columns of a training config and nothing
    else; its batch size is not the training batch size).
    """
    prog = prog or sys.argv[0]
    parser = build_parser(sections, prog, description)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        namespace, extra = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise _argument_error(e, argv) from None
    if extra:
        raise _unknown_argument(extra, parser.flags, prog)
    args = vars(namespace)
    config_path = args.pop("config", None) or config_file

    fields = {f.name: (cls, f, tp) for cls in sections for f, tp in _resolved_fields(cls)}
    ignored = {f.name for cls in ignored_sections for f, _ in _resolved_fields(cls)} - set(fields)
    if yaml_sections is not None:
        from_yaml = {f.name for cls in yaml_sections for f, _ in _resolved_fields(cls)}
        ignored |= set(fields) - from_yaml
    values: dict[str, Any] = {}
    if config_path:
        data, lines = _yaml_with_lines(config_path)
        for key, value in data.items():
            where = f"{config_path}:{lines.get(str(key), 1)}"
            if key in ignored:
                continue
            if key not in fields:
                raise UserError(f"{where}: unknown option '{key}'{_suggest(str(key), sorted(set(fields) | ignored))}. "
                                f"Run {prog} --help for the list of options.")
            _, f, tp = fields[key]
            try:
                values[key] = convert_value(key, value, tp, f.metadata.get("choices"))
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
    for key, value in args.items():
        _, f, tp = fields[key]
        try:
            values[key] = convert_value(f"--{key}", value, tp, f.metadata.get("choices"))
        except ValueError as e:
            raise UserError(str(e)) from None

    out = []
    for cls in sections:
        kwargs = {f.name: values[f.name] for f, _ in _resolved_fields(cls) if f.name in values}
        instance = cls(**kwargs)
        validate = getattr(instance, "validate", None)
        if validate:
            validate()
        out.append(instance)
    return out


def to_dict(*sections: Any) -> dict[str, Any]:
    """Flat mapping of every option, in declaration order (the resolved config)."""
    out: dict[str, Any] = {}
    for section in sections:
        out.update(dataclasses.asdict(section))
    return out


def dump_yaml(*sections: Any) -> str:
    return yaml.safe_dump(to_dict(*sections), allow_unicode=True, sort_keys=False)
