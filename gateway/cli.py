"""The `gateway` command: `serve`, and admin commands that talk to the admin API.

Admin commands find the gateway at $GATEWAY_URL (default http://127.0.0.1:8080) and the
admin key in $GATEWAY_ADMIN_KEY or, failing that, in $GATEWAY_DATA_DIR/admin-key.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from typing import Any

import click
import httpx
import orjson

from gateway.auth import data_dir
from gateway.errors import ConfigError

API = "/api/ai-gateway"
KEY_PAGE = 100  # key records per page of the key list, when exporting every key


def _admin_key() -> str:
    key = os.environ.get("GATEWAY_ADMIN_KEY")
    if key:
        return key
    path = data_dir() / "admin-key"
    try:
        return path.read_text().strip()
    except OSError:
        raise click.ClickException(
            f"no admin key: set GATEWAY_ADMIN_KEY or run where {path} exists"
        ) from None


def _call(method: str, path: str, **kwargs: Any) -> Any:
    url = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8080").rstrip("/") + API + path
    headers = {"authorization": f"Bearer {_admin_key()}"}
    try:
        response = httpx.request(method, url, headers=headers, timeout=30, **kwargs)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the gateway at {url}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text}}
    if response.status_code >= 400:
        message = (body.get("error") or {}).get("message", response.text)
        raise click.ClickException(f"{response.status_code}: {message}")
    return body


def _show(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@click.group()
@click.version_option(package_name="ai-gateway")
def main() -> None:
    """ai-gateway: metered keys, exact limits, spend caps, caching and fallback for LLMs."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config.")
def serve(host: str, port: int, workers: int, config_path: str | None) -> None:
    """Run the gateway (with an embedded store unless GATEWAY_REDIS_URL is set)."""
    from gateway.server import serve as run

    try:
        run(host, port, workers, config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def keys() -> None:
    """Mint, list, show and revoke gateway keys."""


@keys.command("create")
@click.option("--name", required=True)
@click.option("--model", "models", multiple=True, help="Allowed model (repeatable; none: all).")
@click.option("--rate-per-min", type=click.IntRange(0), default=0, help="0: unlimited.")
@click.option("--monthly-cap", type=click.FloatRange(0), default=0.0, help="USD; 0: none.")
@click.option("--hard-cap", type=click.FloatRange(0), default=0.0, help="USD; 0: none.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the raw key.")
def keys_create(
    name: str,
    models: tuple[str, ...],
    rate_per_min: int,
    monthly_cap: float,
    hard_cap: float,
    quiet: bool,
) -> None:
    """Mint a key. The raw key is printed this once and is never shown again."""
    body = {
        "name": name,
        "allowed_models": list(models),
        "rate_per_min": rate_per_min,
        "monthly_cap": monthly_cap,
        "hard_cap": hard_cap,
    }
    created = _call("POST", "/keys", json=body)
    if quiet:
        click.echo(created["key"])
    else:
        _show(created)


@keys.command("list")
def keys_list() -> None:
    """Every key, without secrets."""
    for record in _call("GET", "/keys")["keys"]:
        state = "revoked" if record["revoked"] else "active"
        month = _against(record["spend_month"], record["monthly_cap"])
        lifetime = _against(record["spend"], record["hard_cap"])
        click.echo(
            f"{record['id']}  {state:7}  month {month}  lifetime {lifetime}  {record['name']}"
        )


def _against(spend: float, cap: float) -> str:
    """`$spend` or `$spend/$cap (NN%)`."""
    if not cap:
        return f"${spend:.6f}"
    return f"${spend:.6f}/${_dollars(cap)} ({spend / cap:.0%})"


def _dollars(amount: float) -> str:
    """Cents at least, and every nano-USD digit a cap has: 5 -> 5.00, 0.00002 -> 0.00002."""
    whole, _, fraction = f"{amount:.9f}".partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


@keys.command("show")
@click.argument("key_id")
def keys_show(key_id: str) -> None:
    """One key with its spend this month and lifetime."""
    _show(_call("GET", f"/keys/{key_id}"))


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key on every replica at once."""
    _show(_call("DELETE", f"/keys/{key_id}"))


@main.group(invoke_without_command=True)
@click.option("--key", "key_id", help="Only this key id.")
@click.option("--since", help="Unix seconds or ISO 8601.")
@click.option("--until", help="Unix seconds or ISO 8601.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--cursor", help="The `next` of the previous page.")
@click.pass_context
def usage(
    context: click.Context,
    key_id: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
) -> None:
    """Usage records, newest first; page on with --cursor. See also: export, totals."""
    if context.invoked_subcommand is None:
        params = {"key": key_id, "since": since, "until": until, "limit": limit, "cursor": cursor}
        _show(_call("GET", "/usage", params={k: v for k, v in params.items() if v}))


EXPORT_FIELDS = (
    "id", "at", "request_id", "key_id", "model", "provider", "input_tokens",
    "output_tokens", "cost", "cost_nano", "cached", "prompt", "prompt_version",
)  # fmt: skip


@usage.command("export")
@click.option("--key", "key_id", help="Only this key id.")
@click.option("--since", help="Unix seconds or ISO 8601.")
@click.option("--until", help="Unix seconds or ISO 8601.")
@click.option("--format", "kind", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option("--output", type=click.File("w", encoding="utf-8"), default="-")
def usage_export(
    key_id: str | None, since: str | None, until: str | None, kind: str, output: Any
) -> None:
    """Every record of the period, streamed page by page (memory stays flat). Without
    --key: key after key in key id order, each key's records newest first."""
    writer = csv.DictWriter(output, EXPORT_FIELDS, extrasaction="ignore") if kind == "csv" else None
    if writer:
        writer.writeheader()
    # One key at a time: a page across every key would read a page from each of them.
    for key in [key_id] if key_id else _key_ids():
        for record in _records(key, since, until):
            if writer:
                writer.writerow(record)
            else:
                output.write(orjson.dumps(record).decode() + "\n")


def _key_ids() -> Iterator[str]:
    """Every key id, in order, a page of the key list at a time."""
    params: dict[str, Any] = {"limit": KEY_PAGE}
    while True:
        page = _call("GET", "/keys", params=params)
        for record in page["keys"]:
            yield record["id"]
        if not page.get("next"):
            return
        params["cursor"] = page["next"]


def _records(key_id: str, since: str | None, until: str | None) -> Iterator[dict[str, Any]]:
    """One key's records of the period, newest first, a page at a time."""
    params: dict[str, Any] = {"key": key_id, "since": since, "until": until, "limit": 1000}
    params = {k: v for k, v in params.items() if v}
    while True:
        page = _call("GET", "/usage", params=params)
        yield from page["records"]
        if not page["next"]:
            return
        params["cursor"] = page["next"]


@usage.command("totals")
@click.option("--key", "key_id", help="Only this key id.")
@click.option("--period", type=click.Choice(["day", "month"]), default="month")
@click.option("--since", help="First day or month, e.g. 2026-12 or 2026-12-01.")
@click.option("--until", help="Last day or month, inclusive.")
def usage_totals(key_id: str | None, period: str, since: str | None, until: str | None) -> None:
    """Requests, tokens and cost per key and model, per day or month."""
    params = {"key": key_id, "period": period, "since": since, "until": until}
    _show(_call("GET", "/usage/totals", params={k: v for k, v in params.items() if v}))


@main.command()
@click.argument("model", required=False)
@click.option("--input-per-1k", type=float, help="USD per 1K input tokens.")
@click.option("--output-per-1k", type=float, help="USD per 1K output tokens.")
def prices(model: str | None, input_per_1k: float | None, output_per_1k: float | None) -> None:
    """Show the price book, or set MODEL's price on every replica."""
    if model is None:
        if input_per_1k is not None or output_per_1k is not None:
            raise click.UsageError("name the MODEL whose price to set")
        _show(_call("GET", "/prices"))
        return
    if input_per_1k is None and output_per_1k is None:
        _show(_call("GET", f"/prices/{model}"))
        return
    current = _call("GET", f"/prices/{model}")
    body = {
        "input_per_1k": current["input_per_1k"] if input_per_1k is None else input_per_1k,
        "output_per_1k": current["output_per_1k"] if output_per_1k is None else output_per_1k,
    }
    _show(_call("PUT", f"/prices/{model}", json=body))


@main.group()
def prompts() -> None:
    """Versioned prompt templates."""


@prompts.command("push")
@click.argument("name")
@click.argument("file", type=click.File("r", encoding="utf-8"))
def prompts_push(name: str, file: Any) -> None:
    """Add FILE's text as the next version of NAME (use - for standard input)."""
    _show(_call("POST", f"/prompts/{name}", json={"template": file.read()}))


@prompts.command("list")
def prompts_list() -> None:
    """Every template with its active and latest version."""
    for prompt in _call("GET", "/prompts")["prompts"]:
        click.echo(f"{prompt['name']}  active v{prompt['active']}  latest v{prompt['latest']}")


@prompts.command("show")
@click.argument("name")
def prompts_show(name: str) -> None:
    """Every version of NAME and which one is active."""
    _show(_call("GET", f"/prompts/{name}"))


@prompts.command("activate")
@click.argument("name")
@click.argument("version", type=click.IntRange(1))
def prompts_activate(name: str, version: int) -> None:
    """Make VERSION the active one, on every replica at its next request."""
    _show(_call("POST", f"/prompts/{name}/activate", json={"version": version}))


@prompts.command("render")
@click.argument("name")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--version", type=click.IntRange(1), help="Default: the active version.")
def prompts_render(name: str, variables: tuple[str, ...], version: int | None) -> None:
    """Print NAME rendered with the given variables."""
    values = {}
    for pair in variables:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--var")
        values[key] = value
    body: dict[str, Any] = {"variables": values}
    if version is not None:
        body["version"] = version
    click.echo(_call("POST", f"/prompts/{name}/render", json=body)["text"])
