"""Option machinery the entry scripts share: one declaration per option, and everything derived from it.

Each concern (dataset, loss, saving, ...) declares its options as the fields of a frozen dataclass
next to the code that uses them: ``option(...)``, ``flag(...)`` or ``refused(...)`` give the name,
type, default, allowed values, help, the switch an option needs and the reason one is refused.
From those declarations come the argparse parser (``OptionParser.add_options``), config-file
coercion (``load_config_file``), the range and choice checks (``Limit``, ``check_choice``), the
switches (``Needs`` through ``switched_off``), the refusals (``check_refused``) and the docs' tables
(tools/write_option_docs.py). ``from_args`` fills the dataclass; only rules between options stay as
code, in the class's ``settle``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import tomllib

from library.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def str2bool(value: str) -> bool:
    """``true/false/1/0/yes/no/on/off`` for options that take an explicit boolean."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------- switched off


def switched_off(label: str, needs: str, why: str = "") -> None:
    """The one policy for an option whose switch is off: the reference runs and ignores it, so do we, with a warning.

    ``label`` is the option as given (``--network_dim 8``), ``needs`` what switches it on. Errors stay
    for values out of range, contradictions, and anything that would make the run differ from what was asked.
    """
    logger.warning("%s does nothing without %s%s: ignored, as sd-scripts does", label, needs, f" ({why})" if why else "")


# ---------------------------------------------------------------------------------------------- value checks


@dataclass(frozen=True)
class Limit:
    """An allowed range; ``None`` ends are open-ended. Every value must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        # Integers are compared as integers: float() would round 2**64 - 1 up to 2**64.
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def words(self) -> str:
        low = None if self.low is None else f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
        high = None if self.high is None else f"{'below' if self.high_open else 'at most'} {_number(self.high)}"
        return " and ".join(w for w in (low, high) if w) or "a finite number"

    def problem(self, label: str, value: float | None, what: str = "") -> str | None:
        """The one wording of a value out of range (naming ``label``, the value and the range), or None."""
        if value is None or self.allows(value):
            return None
        return f"{label} {_number(value)} is out of range: it must be {self.words()}" + (f" ({what})" if what else "")

    def check(self, label: str, value: float | None, what: str = "") -> None:
        """Refuse ``value`` outside the range with ``problem``'s message."""
        wrong = self.problem(label, value, what)
        if wrong:
            raise UserError(wrong)


def _number(x: float) -> str:
    """A value as the user typed it: integers whole, floats without trailing noise."""
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def check_range(name: str, value: float | int | None, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, what: str = "") -> None:
    """Refuse ``--name value`` outside ``[low, high]`` (``low_open``/``high_open`` make it strict).

    None means "not given" and passes. The message names the option, the value and the range.
    """
    Limit(low, high, low_open, high_open).check(f"--{name}", value, what)


def check_choice(name: str, value: str | None, choices: Iterable[str], *, case_sensitive: bool = True) -> str | None:
    """Return the canonical spelling of ``value`` among ``choices``, or stop with a suggestion."""
    if value is None:
        return None
    choices = list(choices)
    for c in choices:
        if value == c or (not case_sensitive and value.lower() == c.lower()):
            return c
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.4)
    hint = f'; did you mean "{close[0]}"?' if close else ""
    raise UserError(f"--{name} {value!r} is not one of {', '.join(choices)}{hint}")


def parse_key_values(name: str, items: Iterable[str] | None) -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=0.9,0.999"]`` -> ``{"weight_decay": 0.01, "betas": (0.9, 0.999)}``.

    The form of sd-scripts' optimizer_args / lr_scheduler_args options: values are Python literals,
    anything else stays a string.
    """
    import ast

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f'--{name} item "{item}" must look like name=value, e.g. "weight_decay=0.01"')
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------- the option spec


@dataclass(frozen=True)
class Needs:
    """The switch an option needs: when the option is set and ``switch`` is off, the run warns (``switched_off``)
    or, where ``error`` says so, stops with ``why``.

    ``why`` completes the sentence after the option and its value; ``off`` tells when the switch counts as off.
    """

    switch: str
    why: str = ""
    error: bool = False
    off: Callable[[Any], bool] = lambda v: not v
    with_value: bool = True  # the message shows the value given


@dataclass(frozen=True)
class PromptKey:
    """The prompt-line key that sets the same setting as a command-line option (``--s`` for ``--steps``).

    ``meaning`` ends the message of a bad line value ("it is the ..."). ``field`` is where a parsed line
    keeps it when that is not the option's field (``seeds``: a line gives a list); ``kind`` how the line's
    text is read when the option's type does not say (library/generation/prompt_lines.py names the kinds).
    """

    key: str
    meaning: str
    field: str = ""
    kind: str = ""
    accumulate: bool = False  # a repeated key adds to the earlier values instead of replacing them


@dataclass(frozen=True)
class Option:
    """One option, declared once as a field of a frozen options dataclass (see ``option``, ``flag``, ``refused``).

    The parser, config-file coercion, the range/choice checks, switches and the docs' tables all read it.
    """

    name: str = ""  # on the command line, without "--"; the field name unless the reference spells it otherwise
    field: str = ""  # the dataclass field it fills
    help: str = ""
    default: Any = None
    type: Any = None
    flag: bool = False  # store_true
    choices: tuple | None = None  # argparse refuses anything else
    one_of: tuple | None = None  # checked after parsing, with a suggestion; the canonical spelling is kept
    case_sensitive: bool = True
    limit: Limit | None = None
    what: str = ""  # said after the range in the out-of-range message
    nargs: str | None = None
    needs: Needs | None = None
    refused: str | None = None  # the reason an option of the reference tool cannot apply here
    reference_default: Any = None  # the reference's default of a refused option, accepted (GUIs write every default)
    joins_list: bool = False  # a config-file list is joined with commas ("resolution = [512, 768]")
    convert: Callable[[Any], Any] | None = None  # the value the options object holds, from the checked value
    group: str | None = None  # the --help group, when not the dataclass's
    required: bool = False  # argparse stops without it
    prompt_key: PromptKey | None = None  # the prompt-line key that sets the same setting
    sets: str | None = None  # the field it fills in the value the run builds, where not its own ("deep_shrink.ratio")

    @property
    def label(self) -> str:
        return f"--{self.name}"

    def is_set(self, value: Any) -> bool:
        """Given, and not as the default (0 is a value: ``0 == False`` must not hide it)."""
        if value is None or value is False or value == []:
            return False
        return not (type(value) is type(self.default) and value == self.default)

    def checked(self, value: Any) -> Any:
        """The value after the choice and range checks (the canonical spelling of a choice)."""
        if self.one_of is not None and value is not None:
            value = check_choice(self.name, value, self.one_of, case_sensitive=self.case_sensitive)
        if self.limit is not None:
            if isinstance(value, list):
                for v in value:
                    self.limit.check(self.label, v, self.what)
            else:
                self.limit.check(self.label, value, self.what)
        return value

    @property
    def meaning(self) -> str:
        """The help text (a refused option's: its reason, and the reference's default that is accepted)."""
        if self.refused is None:
            return self.help
        if self.reference_default is None or self.flag:
            return self.refused
        return f"{self.refused}. sd-scripts' default {self.reference_default} is accepted; any other value stops the run"

    def add_to(self, group: Any) -> None:
        help_text = f"refused: {self.meaning}" if self.refused is not None else self.help
        if self.flag:
            group.add_argument(self.label, action="store_true", default=self.default, help=help_text)
            return
        kwargs: dict[str, Any] = {"default": self.default, "help": help_text}
        if self.required:
            kwargs["required"] = True
        for key in ("type", "nargs", "choices"):
            if getattr(self, key) is not None:
                kwargs[key] = list(self.choices) if key == "choices" else getattr(self, key)
        group.add_argument(self.label, **kwargs)


def option(default: Any = None, *, help: str, name: str = "", type: Any = None, choices: Iterable | None = None,
           one_of: Iterable | None = None, case_sensitive: bool = True, limit: Limit | None = None, what: str = "",
           nargs: str | None = None, needs: Needs | None = None, joins_list: bool = False,
           convert: Callable[[Any], Any] | None = None, group: str | None = None, held: Any = dataclasses.MISSING,
           repr: bool = True, required: bool = False, prompt_key: PromptKey | None = None,
           sets: str | None = None) -> Any:
    """A field that is an option taking a value.

    The dataclass default is ``held`` where the options object holds another form than the command
    line (a dict for ``name=value`` items), else ``convert(default)``.
    """
    spec = Option(name=name, help=help, default=default, type=type, choices=None if choices is None else tuple(choices),
                  one_of=None if one_of is None else tuple(one_of), case_sensitive=case_sensitive, limit=limit, what=what,
                  nargs=nargs, needs=needs, joins_list=joins_list, convert=convert, group=group, required=required,
                  prompt_key=prompt_key, sets=sets)
    if held is dataclasses.MISSING:
        held = convert(default) if convert is not None and default is not None else default
    if isinstance(held, (list, dict)):
        return field(default_factory=lambda: type_copy(held), repr=repr, metadata={"option": spec})
    return field(default=held, repr=repr, metadata={"option": spec})


def type_copy(value: Any) -> Any:
    return value.copy()


def flag(*, help: str, name: str = "", default: bool | None = False, needs: Needs | None = None,
         group: str | None = None) -> Any:
    """A field that is a store_true option (``default=None`` where "not given" must stay visible)."""
    return field(default=bool(default), metadata={"option": Option(name=name, help=help, default=default, flag=True,
                                                                   needs=needs, group=group)})


def refused(reason: str, *, flag: bool = False, type: Any = None, nargs: str | None = None,
            reference_default: Any = None, group: str | None = None) -> Any:
    """An option of the reference tool that cannot apply here: it parses, and so does the reference's default
    (configs written by GUIs list every option), but setting it stops the run with ``reason``.

    Not part of the options object (``init=False``, never compared): nothing reads it.
    """
    spec = Option(help="", flag=flag, type=type, nargs=nargs, refused=reason, reference_default=reference_default,
                  default=False if flag else None, group=group)
    return field(default=None, init=False, repr=False, compare=False, metadata={"option": spec})


def options_of(cls: type) -> list[Option]:
    """The options a dataclass declares, in declaration order, each knowing its field."""
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is not None:
            out.append(dataclasses.replace(spec, name=spec.name or f.name, field=f.name))
    return out


def option_label(cls: type, field_name: str) -> str:
    """``--name`` of the option that fills ``cls.field_name``: messages elsewhere take the name from the spec."""
    for opt in options_of(cls):
        if opt.field == field_name:
            return opt.label
    raise KeyError(f"{cls.__name__} declares no option {field_name}")


class Options:
    """Base of the frozen options dataclasses: ``from_args`` fills one from its declarations.

    ``group`` is the --help section of its options; ``settle(values, args)``, where a class has one,
    holds its rules between options.
    """

    group: ClassVar[str] = ""

    @classmethod
    def from_args(cls: type[T], args: argparse.Namespace) -> T:
        return from_args(cls, args)


class OptionParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that knows the spec of its options (for refusals, config files and docs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.options: dict[str, Option] = {}
        self._groups: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    def add_argument_group(self, title: str, *args: Any, **kwargs: Any) -> Any:
        """One group per title, so options declared in several places share their --help section."""
        if title not in self._groups:
            self._groups[title] = super().add_argument_group(title, *args, **kwargs)
        return self._groups[title]

    def add_options(self, *declared: type | Option) -> None:
        """Add every option the dataclasses declare (or the ``Option``s given), in their --help groups."""
        for item in declared:
            for opt in [item] if isinstance(item, Option) else options_of(item):
                opt = dataclasses.replace(opt, group=opt.group or item.group)
                opt.add_to(self.add_argument_group(opt.group))
                self.options[opt.name] = opt


def check_refused(parser: OptionParser, args: argparse.Namespace) -> None:
    """Stop with the reason when a refused option is set (to anything but the reference's default)."""
    for opt in parser.options.values():
        value = getattr(args, opt.name, None)
        # "" too: GUIs write an unused path option as an empty string, which the reference reads as unset
        if opt.refused is not None and value not in (None, False, [], "", opt.reference_default):
            raise UserError(f"{opt.label} {_show(value)}: {opt.refused}")


def _show(value: Any) -> str:
    if value is True:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def option_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of the options ``cls`` declares, read from ``args`` and checked one by one.

    Choices get their canonical spelling, ranges are checked, and an option set without its switch
    warns or stops as its ``Needs`` says. ``convert`` is not applied yet: see ``from_args``.
    """
    values = {}
    for opt in options_of(cls):
        if opt.refused is None:
            values[opt.field] = opt.checked(getattr(args, opt.name))
    for opt in options_of(cls):
        if opt.needs is None or not opt.is_set(values[opt.field]) or not opt.needs.off(getattr(args, opt.needs.switch)):
            continue
        given = f"{opt.label} {_show(getattr(args, opt.name)) if opt.needs.with_value else ''}".rstrip()
        if opt.needs.error:
            raise UserError(f"{given} {opt.needs.why}")
        switched_off(given, f"--{opt.needs.switch}", opt.needs.why)
    return values


def from_args(cls: type[T], args: argparse.Namespace, **derived: Any) -> T:
    """The frozen options ``cls`` declares, filled from ``args``: checked, converted, plus ``derived`` fields.

    A class with cross-field rules gives them as ``settle(values, args) -> values``, run after the
    per-option checks and before ``convert``.
    """
    values = option_values(cls, args)
    settle = getattr(cls, "settle", None)
    if settle is not None:
        values = settle(values, args)
    specs = {o.field: o for o in options_of(cls)}
    for key, value in values.items():
        spec = specs.get(key)
        if spec is not None and spec.convert is not None and value is not None:
            values[key] = spec.convert(value)
    return cls(**values, **derived)


# ---------------------------------------------------------------------------------------------- config files


def _flatten(data: dict, options: set[str], prefix: str = "") -> dict[str, tuple[Any, str]]:
    """{key: (value, section)} with sections flattened one or more levels deep.

    A table under an option's own name (``conditioning_preprocessor_args = { low = 100 }``) is
    that option's value, not a section.
    """
    out: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in options:
            out.update(_flatten(value, options, f"{prefix}[{key}]"))
        else:
            out[key] = (value, prefix or "top level")
    return out


def _coerce(opt: Option, value: Any, where: str) -> Any:
    """Check and convert a config-file value to what the option takes."""
    name = opt.name
    if opt.flag:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(value, dict) and opt.nargs in ("*", "+"):
        value = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in value.items()]  # the name=value form
    if opt.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(opt, v, where) for v in items]
    if isinstance(value, list) and opt.joins_list:
        return ",".join(str(v) for v in value)
    return _coerce_scalar(opt, value, where)


def _coerce_scalar(opt: Option, value: Any, where: str) -> Any:
    name = opt.name
    kind = opt.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {name} must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {name} must be a number, got {value!r}")
        value = float(value)
    elif kind is str2bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {name} must be true or false, got {value!r}")
    elif isinstance(value, (dict, list)):
        raise UserError(f"{where}: {name} must be a single value, got {value!r}")
    elif callable(kind) and kind is not str and isinstance(value, str):
        try:
            value = kind(value)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"{where}: {name} = {value!r}: {e}") from None
    elif not isinstance(value, str):
        value = str(value)
    if opt.choices and value not in opt.choices:
        raise UserError(f"{where}: {name} = {value!r} is not one of {', '.join(map(str, opt.choices))}")
    return value


def load_config_file(path: str, parser: OptionParser, skip: Iterable[str] = (),
                     foreign: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Validated option values from a TOML whose keys are option names (sections are flattened).

    A ``foreign`` key (one the reference tool reads and ignores, such as the kohya_ss GUI's) is ignored
    with a warning. Unlike the reference tool, any other unknown key is an error that suggests the
    closest option, so a typo never silently trains with a default.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {file}")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {file} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {file}: {e}") from None
    actions = {name: opt for name, opt in parser.options.items() if name not in skip}
    values = {}
    for key, (value, section) in _flatten(data, set(actions)).items():
        where = f"{file} {section}"
        if key not in actions and key in foreign:
            logger.warning("%s: %s is not an option of this script (another sd-scripts script or the kohya_ss GUI "
                           "writes it): ignored, as sd-scripts does", where, key)
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
            hint = f' Did you mean "{close[0]}"?' if close else " See docs/training.md for the option list."
            raise UserError(f'{where}: unknown option "{key}".{hint}')
        values[key] = _coerce(actions[key], value, where)
    return values
