"""The config file is refused at start with the file, the key and the problem named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_module
from gateway.errors import ConfigError

ROUTE = [{"provider": "local", "model": "m"}]
GOOD: dict[str, Any] = {
    "providers": {"local": {"type": "mock"}},
    "models": {"m": {"input_per_1k": 0, "output_per_1k": 0.5, "routes": ROUTE}},
}


def test_builtin_config_serves_mock_echo() -> None:
    config = config_module.load(None)
    assert config.models["mock-echo"].input_per_1k == config_module.Decimal("0.001")
    assert config.providers["mock"].type == "mock"
    assert (config.cache.ttl_seconds, config.cache.scope) == (3600, "key")


def test_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "cache: {ttl_seconds: 60, scope: global}\n"
        "providers:\n  local: {type: mock}\n"
        "models:\n  m:\n    input_per_1k: 0.00015\n    output_per_1k: 0\n"
        "    routes: [{provider: local, model: m}]\n"
    )
    config = config_module.load(str(path))
    assert config.cache.scope == "global"
    assert str(config.models["m"].input_per_1k) == "0.00015"


def with_change(path: str, value: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "providers": {"local": {"type": "mock"}},
        "models": {"m": {"input_per_1k": 0, "output_per_1k": 0.5, "routes": list(ROUTE)}},
    }
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        pytest.param("models.m.routes", [{"provider": "ghost", "model": "x"}],
                     "models.m.routes.0.provider: unknown provider 'ghost'", id="unknown-provider"),
        pytest.param("models.m.input_per_1k", None, "models.m.input_per_1k", id="no-price"),
        pytest.param("models.m.routes", None, "models.m.routes", id="no-routes"),
        pytest.param("models.m.routes", [], "models.m.routes", id="empty-routes"),
        pytest.param("models.m.output_per_1k", -1, "models.m.output_per_1k", id="negative-price"),
        pytest.param("models.m.output_per_1k", "cheap", "models.m.output_per_1k", id="price-type"),
        pytest.param("providers.local.type", "grpc", "providers.local.type", id="provider-type"),
        pytest.param("providers.web", {"type": "openai"}, "providers.web.base_url",
                     id="missing-base-url"),
        pytest.param("cache", {"scope": "team"}, "cache.scope", id="cache-scope"),
        pytest.param("models.m.colour", "red", "models.m.colour", id="unknown-key"),
    ],
)  # fmt: skip
def test_bad_config_names_file_key_and_problem(
    tmp_path: Path, path: str, value: Any, named: str
) -> None:
    import yaml

    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(with_change(path, value)))
    with pytest.raises(ConfigError) as raised:
        config_module.load(str(file))
    assert str(file) in str(raised.value)
    assert named in str(raised.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("models: [unclosed", "not valid YAML", id="yaml"),
        pytest.param("- a list", "top level must be a mapping", id="list"),
    ],
)
def test_unreadable_config(tmp_path: Path, text: str, problem: str) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        config_module.load(str(file))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config_module.load(str(tmp_path / "absent.yaml"))


async def test_mock_provider_counts_tokens_deterministically() -> None:
    """A word per token, plus 3 per message for input; max_tokens truncates the echo."""
    from gateway.providers.mock import MockProvider

    provider = MockProvider("mock")
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "one two three four"},
        ]
    }
    done = await provider.complete(body, "echo")
    assert (done.input_tokens, done.output_tokens) == (2 + 3 + 4 + 3, 5)
    assert done.body["choices"][0]["message"]["content"] == "echo: one two three four"
    assert done.body["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    cut = await provider.complete({**body, "max_tokens": 2}, "echo")
    assert cut.output_tokens == 2
    assert cut.body["choices"][0]["message"]["content"] == "echo: one"
    assert cut.body["choices"][0]["finish_reason"] == "length"
