"""Command lines built from config dataclasses: every clipforge stage turns argv into its config the same way.

A stage's config is a dataclass whose fields are declared with `opt(default, help=...)`; a field whose type is
itself such a dataclass is a section, and its fields become flags too (listed under the section's heading in
--help). One field = one flag, named `--field-name` unless `flag=` says otherwise; booleans get `--x / --no-x`.

    CLI(Config, prog="clipforge x", presets={"default": Config, "tiny": Config.tiny}).parse(argv) -> Config

parses argv, starts from the chosen preset (`--preset NAME`, or the shorthand `--NAME`), applies exactly the flags
given, and builds the config once, so each dataclass validates itself in __post_init__; a ValueError there is a
usage error (exit 2, with the message). `--print-config` prints the resolved config as JSON and exits 0. `flat(cfg)`
is the config as {flag dest: value} (what a run records), and `with_flags(cfg, **values)` goes back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from functools import lru_cache
from types import UnionType
from typing import Any, Callable

_META = "clipforge_flag"


def opt(default: Any = MISSING, *, help: str, default_factory: Callable[[], Any] | Any = MISSING,
        flag: str | None = None, positional: bool = False, required: bool = False, choices=None, nargs=None,
        metavar=None, action: str | None = None, exclusive: str | None = None) -> Any:
    """A config field that is also a command-line option. `exclusive`: flags sharing this name exclude each other."""
    meta = {_META: {"help": help, "flag": flag, "positional": positional, "required": required, "choices": choices,
                    "nargs": nargs, "metavar": metavar, "action": action, "exclusive": exclusive}}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested config (a dataclass of opt() fields), defaulting to cls()."""
    return field(default_factory=cls)


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]  # attribute path from the top config, e.g. ("optim", "batch_size")
    field: Field
    type: Any  # the resolved annotation
    owner: type  # the dataclass that declares the field

    @property
    def meta(self) -> dict:
        return self.field.metadata[_META]

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_") if not self.meta["positional"] else self.field.name

    @property
    def flag(self) -> str:
        return self.meta["flag"] or "--" + self.field.name.replace("_", "-")

    def default(self):
        f = self.field
        return f.default_factory() if f.default_factory is not MISSING else f.default


@lru_cache(maxsize=None)
def leaves(cls: type, prefix: tuple[str, ...] = ()) -> tuple[Leaf, ...]:
    """Every option of a config class, sections flattened, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            out.extend(leaves(t, prefix + (f.name,)))
        elif _META in f.metadata:
            out.append(Leaf(prefix + (f.name,), f, t, cls))
    dests = [leaf.dest for leaf in out]
    dup = {d for d in dests if dests.count(d) > 1}
    if dup:
        raise TypeError(f"{cls.__name__}: options {sorted(dup)} are declared twice")
    return tuple(out)


def flag_of(cls: type, name: str) -> str:
    """The command-line spelling of field `name` of config class `cls` (for error messages)."""
    leaf = next(leaf for leaf in leaves(cls) if leaf.path == (name,))
    return leaf.field.name if leaf.meta["positional"] else leaf.flag


def require(cfg, name: str, ok: bool, message: str) -> None:
    """ValueError('--flag <message>') unless ok: the validation helper of every config's __post_init__."""
    if not ok:
        raise ValueError(f"{flag_of(type(cfg), name)} {message}")


# ------------------------------------------------------------------------------------------------ values
def _scalar(t):
    """(element type, container) of an annotation: int -> (int, None), list[str] -> (str, list),
    tuple[float, float] -> (float, tuple), X | None -> X's."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
        origin = typing.get_origin(t)
    if origin in (list, tuple):
        return typing.get_args(t)[0], origin
    return t, None


def _coerce(t, value):
    _, container = _scalar(t)
    if container is tuple and isinstance(value, list):
        return tuple(value)
    return value


def build(cls: type, values: dict):
    """cls from a nested dict (dataclasses.asdict's layout): sections first, then cls itself validates."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        t = hints[f.name]
        kwargs[f.name] = build(t, values[f.name]) if is_dataclass(t) else _coerce(t, values[f.name])
    return cls(**kwargs)


def flat(cfg) -> dict:
    """{flag dest: value} of every option (sections flattened)."""
    out = {}
    for leaf in leaves(type(cfg)):
        value = cfg
        for name in leaf.path:
            value = getattr(value, name)
        out[leaf.dest] = list(value) if isinstance(value, tuple) else value
    return out


def with_flags(cfg, **values):
    """A copy of cfg with the options named by flag dest set (validated). TypeError for an unknown name."""
    return _apply(type(cfg), dataclasses.asdict(cfg), values)


def _defaults(cls: type) -> dict:
    """The nested dict of cls's field defaults, without building (and so validating) a default instance."""
    hints, tree = typing.get_type_hints(cls), {}
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            tree[f.name] = _defaults(hints[f.name])
        elif f.default_factory is not MISSING:
            tree[f.name] = f.default_factory()
        elif f.default is not MISSING:
            tree[f.name] = f.default
    return tree


def _apply(cls: type, tree: dict, values: dict):
    by_dest = {leaf.dest: leaf for leaf in leaves(cls)}
    unknown = set(values) - set(by_dest)
    if unknown:
        raise TypeError(f"{cls.__name__} has no options {sorted(unknown)}")
    for dest, value in values.items():
        *parents, last = by_dest[dest].path
        node = tree
        for name in parents:
            node = node[name]
        node[last] = value
    return build(cls, tree)


# ------------------------------------------------------------------------------------------------ argparse
def _add(group, leaf: Leaf) -> None:
    m, (elem, container) = leaf.meta, _scalar(leaf.type)
    default = leaf.default()
    shown = "" if m["positional"] or m["required"] or default in (None, "", []) else f" (default: {_show(default)})"
    kw: dict = {"help": (m["help"] + shown).replace("%", "%%"), "default": argparse.SUPPRESS}
    if elem is bool and container is None:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = elem
        if m["action"]:
            kw["action"] = m["action"]
        elif container is tuple:
            kw["nargs"] = len(typing.get_args(_strip_none(leaf.type)))
        elif container is list:
            kw["nargs"] = m["nargs"] or "+"
        elif m["nargs"]:
            kw["nargs"] = m["nargs"]
        for key in ("choices", "metavar"):
            if m[key] is not None:
                kw[key] = m[key]
    if m["positional"]:
        group.add_argument(leaf.dest, **kw)
        return
    if m["required"]:
        kw["required"] = True
    group.add_argument(leaf.flag, dest=leaf.dest, **kw)


def _strip_none(t):
    if typing.get_origin(t) in (typing.Union, UnionType):
        return next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def config_values(cls: type, path: str) -> dict:
    """{flag dest: value} from a JSON / TOML file of option values: nested by section (dataclasses.asdict's layout)
    or flat by option name. ValueError for an unreadable file or an unknown option."""
    import tomllib

    try:
        text = open(path, "rb").read()
        data = tomllib.loads(text.decode()) if path.endswith(".toml") else json.loads(text)
    except (OSError, ValueError) as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"--config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table / object of option values")
    by_path = {leaf.path: leaf.dest for leaf in leaves(cls)}
    by_dest = set(by_path.values())
    out: dict = {}

    def walk(node: dict, prefix: tuple) -> None:
        for name, value in node.items():
            key = prefix + (name,)
            if key in by_path:
                out[by_path[key]] = value
            elif not prefix and name in by_dest:
                out[name] = value
            elif isinstance(value, dict) and any(p[:len(key)] == key for p in by_path):
                walk(value, key)
            else:
                raise ValueError(f"--config {path}: unknown option {'.'.join(key)!r}")

    walk(data, ())
    return out


class CLI:
    """The parser of one config class (see the module docstring)."""

    def __init__(self, cls: type, prog: str, description: str = "", presets: dict[str, Callable] | None = None,
                 epilog: str | None = None, config_file: bool = False):
        self.cls, self.presets, self.config_file = cls, dict(presets or {"default": cls}), config_file
        self.parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                                              formatter_class=argparse.RawDescriptionHelpFormatter)
        groups: dict[tuple, Any] = {(): self.parser}
        for leaf in leaves(cls):
            owner_path = leaf.path[:-1]
            if owner_path not in groups:
                doc = (leaf.owner.__doc__ or "").strip().split("\n")[0]
                groups[owner_path] = self.parser.add_argument_group(".".join(owner_path), doc or None)
            _add(groups[owner_path], leaf)
        self._add_meta_options()

    def _add_meta_options(self) -> None:
        p = self.parser
        if len(self.presets) > 1:
            names = sorted(self.presets)
            p.add_argument("--preset", choices=names, default="default" if "default" in names else names[0],
                           help="the base values; the flags given override them")
            for name in names:
                if name != "default":
                    p.add_argument(f"--{name}", dest="preset", action="store_const", const=name,
                                   help=f"= --preset {name}")
        if self.config_file:
            p.add_argument("--config", dest="config_file", metavar="FILE", default=None,
                           help="a JSON or TOML file of option values (nested by section, or flat by option name) "
                                "applied over the preset; flags given override it")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")

    def _check_exclusive(self, given: dict) -> None:
        """Options declared with the same `exclusive` name may not be given together (argparse's mutually
        exclusive groups cannot sit inside the sections' argument groups)."""
        sets: dict[str, list[str]] = {}
        for leaf in leaves(self.cls):
            if leaf.meta["exclusive"] and leaf.dest in given:
                sets.setdefault(leaf.meta["exclusive"], []).append(leaf.flag)
        for flags in sets.values():
            if len(flags) > 1:
                self.parser.error(f"argument {flags[1]}: not allowed with argument {flags[0]}")

    def parse(self, argv: list[str] | None, adjust: Callable[[dict], dict] | None = None):
        """-> the config. SystemExit(2) on a usage or validation error, SystemExit(0) after --help / --print-config.
        adjust(values) may rewrite the given {dest: value} before they are applied."""
        ns = vars(self.parser.parse_args(argv))
        preset, show, path = ns.pop("preset", "default"), ns.pop("print_config"), ns.pop("config_file", None)
        self._check_exclusive(ns)
        if adjust is not None:
            ns = adjust(ns)
        make = self.presets[preset]
        try:  # the class itself: its defaults, which alone need not be a valid config (required options)
            tree = _defaults(self.cls) if make is self.cls else dataclasses.asdict(make())
            cfg = _apply(self.cls, tree, {**(config_values(self.cls, path) if path else {}), **ns})
        except (ValueError, TypeError) as e:
            self.parser.error(str(e))
        if show:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            sys.stdout.flush()
            raise SystemExit(0)
        return cfg


def run_main(cli: CLI, argv, run: Callable[[Any], int], errors: tuple = (), prefix: str = "") -> int:
    """The common main(): parse (usage errors -> 2), run(cfg) -> exit code; `errors` raised by run print as
    'PREFIX: error: ...' and exit 2."""
    try:
        cfg = cli.parse(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(run(cfg) or 0)
    except errors as e:
        print(f"{prefix or cli.parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
