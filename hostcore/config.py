"""The backend configuration string: one string picks the backend of every stage.

Grammar (whitespace around tokens is ignored)::

    config  := [entry ("," entry)*]
    entry   := STAGE "=" NAME [ "(" [option ("," option)*] ")" ]
    option  := KEY "=" VALUE
    STAGE   := prepare | dispatch | preprocess | experts | sentinel
    NAME, KEY := [A-Za-z_][A-Za-z0-9_.-]*
    VALUE   := true | false | integer | float | bare word | "double-quoted string"

Example: ``dispatch=torch_a2a,preprocess=torch(mode=checked),experts=torch,sentinel=non_local``.
Each stage appears at most once. Omitted stages take `DEFAULTS`. ``str(cfg)`` is
canonical (pipeline order, options sorted, values typed) and
``BackendConfig.parse(str(cfg)) == cfg``. Sources, strongest first: the
``--backends`` flag (or the ``backends=`` argument), the ``HOSTCORE_BACKENDS``
environment variable, then `DEFAULTS`; a stronger source overrides whole stages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .contract import Stage
from .errors import ConfigError
from .hookspecs import OptionValue

ENV_VAR = "HOSTCORE_BACKENDS"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)")
_BARE = re.compile(r"[A-Za-z0-9_.+\-/:]+")
_STAGES = {s.value: s for s in Stage}


@dataclass(frozen=True)
class BackendChoice:
    """The backend picked for one stage and its options (sorted by key)."""

    name: str
    options: tuple[tuple[str, OptionValue], ...] = ()

    @classmethod
    def of(cls, name: str, /, **options: OptionValue) -> BackendChoice:
        return cls(name, tuple(sorted(options.items())))

    @property
    def option_dict(self) -> dict[str, OptionValue]:
        return dict(self.options)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({','.join(f'{k}={_format_value(v)}' for k, v in self.options)})"


DEFAULTS: Mapping[Stage, BackendChoice] = {
    Stage.PREPARE: BackendChoice("passthrough"),
    Stage.DISPATCH: BackendChoice("torch_a2a"),
    Stage.PREPROCESS: BackendChoice("torch"),
    Stage.EXPERTS: BackendChoice("torch"),
    Stage.SENTINEL: BackendChoice("auto"),
}
"""Used for every stage a configuration leaves out."""


@dataclass(frozen=True)
class BackendConfig:
    """A backend choice per stage; stages not set fall back to `DEFAULTS` in `complete`."""

    choices: Mapping[Stage, BackendChoice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", {s: self.choices[s] for s in Stage if s in self.choices})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BackendConfig) and dict(self.choices) == dict(other.choices)

    def __hash__(self) -> int:
        return hash(tuple(self.choices.items()))

    def __str__(self) -> str:
        return ",".join(f"{stage}={choice}" for stage, choice in self.choices.items())

    def __getitem__(self, stage: Stage) -> BackendChoice:
        return self.choices[stage]

    @classmethod
    def parse(cls, text: str) -> BackendConfig:
        """Parse the grammar above; raise `ConfigError` pointing at the offending column."""
        return cls(_Parser(text).config())

    def overridden_by(self, stronger: BackendConfig) -> BackendConfig:
        """This configuration with every stage that ``stronger`` sets replaced."""
        return BackendConfig({**self.choices, **stronger.choices})

    def complete(self) -> BackendConfig:
        """Every stage set: omitted stages take `DEFAULTS`."""
        return BackendConfig(DEFAULTS).overridden_by(self)


def resolve_config(backends: str | BackendConfig | None = None, environ: Mapping[str, str] | None = None) -> BackendConfig:
    """The complete configuration from the flag/argument, ``HOSTCORE_BACKENDS`` and the defaults."""
    env = os.environ if environ is None else environ
    config = BackendConfig()
    if env.get(ENV_VAR, "").strip():
        try:
            config = BackendConfig.parse(env[ENV_VAR])
        except ConfigError as exc:
            raise ConfigError(f"in ${ENV_VAR}: {exc}") from None
    if isinstance(backends, str):
        backends = BackendConfig.parse(backends)
    if backends is not None:
        config = config.overridden_by(backends)
    return config.complete()


def _format_value(value: OptionValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if _BARE.fullmatch(value) and isinstance(_parse_bare(value), str):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_bare(word: str) -> OptionValue:
    if word in ("true", "false"):
        return word == "true"
    if _INT.fullmatch(word):
        return int(word)
    if _FLOAT.fullmatch(word):
        return float(word)
    return word


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, expected: str) -> ConfigError:
        found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of string"
        caret = " " * self.pos + "^"
        return ConfigError(f"backend config: expected {expected} at column {self.pos + 1}, found {found}\n"
                           f"  {self.text}\n  {caret}\n"
                           "  grammar: stage=name[(key=value,...)],... e.g. "
                           "dispatch=torch_a2a,preprocess=torch(mode=checked),sentinel=non_local")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self, char: str) -> bool:
        self.skip_space()
        return self.text.startswith(char, self.pos)

    def expect(self, char: str, what: str) -> None:
        if not self.peek(char):
            raise self.fail(what)
        self.pos += 1

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip_space()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.fail(what)
        self.pos = m.end()
        return m.group(0)

    def config(self) -> dict[Stage, BackendChoice]:
        choices: dict[Stage, BackendChoice] = {}
        self.skip_space()
        if self.pos == len(self.text):
            return choices
        while True:
            start = self.pos
            stage_name = self.match(_NAME, "a stage name (" + ", ".join(_STAGES) + ")")
            if stage_name not in _STAGES:
                self.pos = start
                raise self.fail("a stage name (" + ", ".join(_STAGES) + f"), not {stage_name!r}")
            stage = _STAGES[stage_name]
            if stage in choices:
                self.pos = start
                raise self.fail(f"each stage once, but {stage_name!r} is set twice")
            self.expect("=", f"'=' after {stage_name!r}")
            choices[stage] = self.choice()
            self.skip_space()
            if self.pos == len(self.text):
                return choices
            self.expect(",", "',' between entries or the end of the string")

    def choice(self) -> BackendChoice:
        name = self.match(_NAME, "a backend name")
        options: dict[str, OptionValue] = {}
        if self.peek("("):
            self.pos += 1
            while not self.peek(")"):
                key_pos = self.pos
                key = self.match(_NAME, "an option name")
                if key in options:
                    self.pos = key_pos
                    raise self.fail(f"each option once, but {key!r} is set twice")
                self.expect("=", f"'=' after option {key!r}")
                options[key] = self.value()
                if not self.peek(")"):
                    self.expect(",", "',' or ')' after an option")
            self.pos += 1
        return BackendChoice.of(name, **options)

    def value(self) -> OptionValue:
        if self.peek('"'):
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            self.expect('"', "a closing '\"'")
            return "".join(out)
        return _parse_bare(self.match(_BARE, "an option value"))
