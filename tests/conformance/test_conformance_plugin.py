"""The kit's pytest plugin in a fresh pytest session: a subclass in a few lines, the seed option, failures."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

THIRD_PARTY_TESTS = '''
from hostcore.conformance import PreprocessContract, SentinelContract


class TestAuto(SentinelContract):
    backend = "auto"
    cases = 5


class TestTorchPreprocess(PreprocessContract):
    backend = "torch"
    cases = 2


class TestForgotTheName(SentinelContract):
    pass


class TestNotInstalled(SentinelContract):
    backend = "autoo"
'''


def test_a_subclass_runs_the_contract_tests_with_the_seed_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_third_party=THIRD_PARTY_TESTS)
    result = pytester.runpytest_inprocess("--hostcore-seed", "7", "-p", "no:cacheprovider", "-rfE")
    result.stdout.fnmatch_lines(["hostcore conformance seed: 7 (--hostcore-seed)"])
    outcomes = result.parseoutcomes()
    sentinel_tests = 5  # methods of SentinelContract
    preprocess_tests = 5
    assert outcomes.get("passed") == sentinel_tests + preprocess_tests, result.stdout.str()
    assert outcomes.get("errors") == 2 * sentinel_tests, result.stdout.str()  # set-up fails for both broken classes
    result.stdout.fnmatch_lines(["*TestForgotTheName must name the sentinel backend it tests*"])
    result.stdout.fnmatch_lines(["*unknown sentinel backend 'autoo'*"])


def test_seed_from_the_environment_and_bad_values(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_seed='''
def test_seed(hostcore_seed):
    assert hostcore_seed == 42
''')
    monkeypatch.setenv("HOSTCORE_SEED", "42")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    monkeypatch.setenv("HOSTCORE_SEED", "forty-two")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert "$HOSTCORE_SEED='forty-two' is not an integer" in result.stderr.str() + result.stdout.str()


def test_a_parametrized_argument_needs_its_class_attribute(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_param='''
class TestNoDtypes:
    def test_it(self, hostcore_dtype):
        pass
''')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert "parametrized from the class attribute `dtypes`, which is missing or empty" in result.stdout.str()
