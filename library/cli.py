"""Option machinery the entry scripts share: config-file keys, refused options and value checks.

Each concern (dataset, loss, saving, ...) declares its own options with ``add_arguments`` next to
the code that uses them, and turns them into a frozen options object with ``from_args``. This
module holds only what they all need: the config-file reader, the refusal of options that cannot
apply, and the range checks whose messages name the option, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import tomllib

from library.errors import UserError

logger = logging.getLogger(__name__)


def str2bool(value: str) -> bool:
    """``true/false/1/0/yes/no/on/off`` for options that take an explicit boolean."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------- refusals


def add_refused(group: Any, name: str, reason: str, *, flag: bool = False, type: Any = None, nargs: str | None = None,
                reference_default: Any = None) -> None:
    """Declare an option of the reference tool that cannot apply here.

    It parses, and so does the reference tool's default value (configs written by GUIs list every
    option with its default), but ``check_refused`` stops with ``reason`` when a user sets it.
    """
    if flag:
        action = group.add_argument(f"--{name}", action="store_true", help=f"refused: {reason}")
    else:
        accepted = "" if reference_default is None else (f". sd-scripts' default {reference_default} is accepted; any other "
                                                         "value stops the run")
        action = group.add_argument(f"--{name}", default=None, type=type, nargs=nargs, help=f"refused: {reason}{accepted}")
    action.refusal = reason
    action.reference_default = reference_default


def check_refused(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for action in parser._actions:
        reason = getattr(action, "refusal", None)
        value = getattr(args, action.dest, None)
        # "" too: GUIs write an unused path option as an empty string, which the reference reads as unset
        if reason is not None and value not in (None, False, [], "", action.reference_default):
            raise UserError(f"--{action.dest} {_show(value)}: {reason}")


def _show(value: Any) -> str:
    if value is True:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------- switched off


def switched_off(label: str, needs: str, why: str = "") -> None:
    """The one policy for an option whose switch is off: the reference runs and ignores it, so do we, with a warning.

    ``label`` is the option as given (``--save_last_n_steps 1``), ``needs`` what switches it on. Errors stay
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

    def check(self, label: str, value: float | None, what: str = "") -> None:
        """Refuse ``value`` outside the range; the message names ``label``, the value and the range."""
        if value is not None and not self.allows(value):
            raise UserError(f"{label} {_number(value)} is out of range: it must be {self.words()}"
                            + (f" ({what})" if what else ""))


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

    The form of sd-scripts' ``--optimizer_args``/``--lr_scheduler_args``: values are Python literals,
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


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """Check and convert a config-file value to what the option takes."""
    name = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if isinstance(value, dict) and action.nargs in ("*", "+"):
        value = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in value.items()]  # the name=value form
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(action, v, where) for v in items]
    if isinstance(value, list) and getattr(action, "joins_list", False):
        return ",".join(str(v) for v in value)
    return _coerce_scalar(action, value, where)


def _coerce_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    name = action.dest
    kind = action.type
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
    if action.choices and value not in action.choices:
        raise UserError(f"{where}: {name} = {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def load_config_file(path: str, parser: argparse.ArgumentParser, skip: Iterable[str] = (),
                     foreign: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Validated option values from a TOML whose keys are option names (sections are flattened).

    A ``foreign`` key (one the reference tool reads and ignores, such as the kohya_ss GUI's) is ignored
    with a warning. Unlike the reference tool, any other unknown key is an error that suggests the
    closest option, so a typo never silently trains with a default.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {file} (given with --config_file)")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {file} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {file}: {e}") from None
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", *skip)}
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
