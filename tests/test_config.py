"""The backend config grammar: parsing, canonical form, round trip, precedence and every error path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostcore.config import DEFAULTS, ENV_VAR, BackendChoice, BackendConfig, resolve_config
from hostcore.contract import Stage
from hostcore.errors import ConfigError


def test_parse_example_from_the_issue() -> None:
    cfg = BackendConfig.parse("dispatch=torch_a2a,preprocess=torch,experts=torch,sentinel=non_local")
    assert cfg[Stage.DISPATCH] == BackendChoice("torch_a2a")
    assert cfg[Stage.SENTINEL].name == "non_local"
    assert Stage.PREPARE not in cfg.choices


def test_options_are_typed_and_sorted() -> None:
    cfg = BackendConfig.parse(' preprocess = torch( mode=checked , z=1, a=2.5, flag=true, s="x,y" ) ')
    choice = cfg[Stage.PREPROCESS]
    assert choice.options == (("a", 2.5), ("flag", True), ("mode", "checked"), ("s", "x,y"), ("z", 1))
    assert str(cfg) == 'preprocess=torch(a=2.5,flag=true,mode=checked,s="x,y",z=1)'


def test_canonical_order_is_pipeline_order() -> None:
    cfg = BackendConfig.parse("sentinel=auto,prepare=passthrough,experts=torch")
    assert str(cfg) == "prepare=passthrough,experts=torch,sentinel=auto"


def test_empty_string_is_all_defaults() -> None:
    assert BackendConfig.parse("  ") == BackendConfig()
    assert BackendConfig().complete().choices == dict(DEFAULTS)


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
values = st.one_of(st.booleans(), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=False, allow_infinity=False, width=64),
                   st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12))
choices = st.builds(lambda name, opts: BackendChoice.of(name, **opts), names,
                    st.dictionaries(names, values, max_size=3))


@given(st.dictionaries(st.sampled_from(list(Stage)), choices))
def test_round_trip(choice_map: dict) -> None:
    cfg = BackendConfig(choice_map)
    assert BackendConfig.parse(str(cfg)) == cfg


def test_strings_that_look_like_numbers_stay_strings() -> None:
    cfg = BackendConfig({Stage.EXPERTS: BackendChoice.of("torch", a="1", b="true", c="")})
    assert str(cfg) == 'experts=torch(a="1",b="true",c="")'
    assert BackendConfig.parse(str(cfg)) == cfg


@pytest.mark.parametrize("text, expected", [
    ("dispatcher=torch_a2a", "a stage name"),
    ("dispatch", "'=' after 'dispatch'"),
    ("dispatch=", "a backend name"),
    ("dispatch=torch_a2a,dispatch=local", "'dispatch' is set twice"),
    ("dispatch=torch_a2a;experts=torch", "',' between entries"),
    ("preprocess=torch(mode=safe", "',' or ')'"),
    ("preprocess=torch(mode)", "'=' after option 'mode'"),
    ("preprocess=torch(mode=a,mode=b)", "'mode' is set twice"),
    ('preprocess=torch(mode="open', "closing"),
    ("preprocess=torch(mode=)", "an option value"),
])
def test_errors_point_at_the_problem(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        BackendConfig.parse(text)
    message = str(info.value)
    assert expected in message
    assert "^" in message and "grammar:" in message


def test_precedence_flag_over_env_over_defaults() -> None:
    env = {ENV_VAR: "dispatch=local,sentinel=guard_slot"}
    cfg = resolve_config("sentinel=non_local", env)
    assert cfg[Stage.DISPATCH].name == "local"
    assert cfg[Stage.SENTINEL].name == "non_local"
    assert cfg[Stage.EXPERTS] == DEFAULTS[Stage.EXPERTS]


def test_bad_env_var_is_named() -> None:
    with pytest.raises(ConfigError, match=rf"\${ENV_VAR}"):
        resolve_config(None, {ENV_VAR: "nope=1"})
