"""Settings without a server: `wham-batch serve`'s config and key rules, and a job's
`model.endpoint` in the spec and in preflight."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.procs import free_port
from support.stubhttp import scripted_server

from pipeline.cli import main as cli_main
from pipeline.contracts.errors import UserError
from pipeline.contracts.secrets import REDACTED, add_secret_env, redact
from pipeline.contracts.spec import spec_from_data
from pipeline.driver.preflight import check_endpoint
from pipeline.serve import ServeConfig, is_loopback, load_config, resolve_api_key
from pipeline.serve.app import replica_kwargs

# ---------------------------------------------------------------- wham-batch serve


def test_flags_override_the_yaml(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"checkpoint": "models/demo", "port": 9000, "max_batch": 8}))
    config = load_config(str(path), {"port": 9100, "host": None})
    assert (config.checkpoint, config.port, config.max_batch, config.host) == (
        str(tmp_path / "models" / "demo"), 9100, 8, "127.0.0.1")  # relative to the YAML
    flagged = load_config(str(path), {"checkpoint": "m/x", "api_key_file": "s3://b/k"})
    assert flagged.checkpoint == str(Path.cwd() / "m" / "x")  # relative to this folder
    assert flagged.api_key_file == "s3://b/k"


@pytest.mark.parametrize(("data", "message"), [
    ({"checkpoint": "m", "prot": 1}, "prot: unknown key"),
    ({"checkpoint": "m", "port": 0}, "port:"),
    ({"checkpoint": "m", "max_batch": 0}, "max_batch:"),
    ({}, "exactly one of checkpoint and preset"),
    ({"checkpoint": "m", "api_key": "secret"}, "api_key: unknown key"),
    ({"checkpoint": "m", "decoding": "zigzag"}, "decoding: Input should be 'sequential', "
     "'diagonal' or 'diagonal-checked'"),
    ({"checkpoint": "m", "max_concurrent_jobs": 0}, "max_concurrent_jobs:"),
    ({"checkpoint": "m", "max_job_lifespan_s": 0}, "max_job_lifespan_s:"),
    # replicas renew their jobs' leases about once a second: a 1 s lease runs out under a
    # live replica whose step takes longer, and its jobs fail as if it had stopped 3 times
    ({"checkpoint": "m", "job_lease_s": 1}, "job_lease_s:"),
])
def test_bad_settings_name_their_field(tmp_path: Path, data: dict, message: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=message):
        load_config(str(path), {})


@pytest.mark.parametrize("decoding", ["diagonal", "diagonal-checked"])
def test_the_decoding_reaches_the_replicas(decoding) -> None:
    config = load_config(None, {"preset": "tiny", "decoding": decoding})
    assert replica_kwargs(config, api_key_sha256=None)["decoding"] == decoding
    assert load_config(None, {"preset": "tiny"}).decoding == "sequential"


def test_the_key_comes_from_the_file_or_the_environment(tmp_path: Path) -> None:
    loopback = ServeConfig(checkpoint="m")
    assert resolve_api_key(loopback, environ={}) is None
    assert resolve_api_key(loopback, environ={"WHAM_API_KEY": " k1 \n"}) == "k1"
    key_file = tmp_path / "key"
    key_file.write_text("k2\n")
    from_file = ServeConfig(checkpoint="m", api_key_file=str(key_file))
    assert resolve_api_key(from_file, environ={"WHAM_API_KEY": "k1"}) == "k2"
    key_file.write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        resolve_api_key(from_file, environ={})
    with pytest.raises(UserError, match="cannot read"):
        resolve_api_key(ServeConfig(checkpoint="m", api_key_file=str(tmp_path / "no")),
                        environ={})


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::", "example.com"])
def test_beyond_loopback_without_a_key_is_refused(host: str) -> None:
    config = ServeConfig(checkpoint="m", host=host)
    with pytest.raises(UserError, match="refusing to listen beyond loopback"):
        resolve_api_key(config, environ={})
    assert resolve_api_key(config, environ={"WHAM_API_KEY": "k"}) == "k"


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "host.internal"]))


def test_the_command_refuses_before_starting_anything(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WHAM_API_KEY", raising=False)
    assert cli_main(["serve", "--checkpoint", "models/demo", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen beyond loopback" in err and "Traceback" not in err
    assert cli_main(["serve", "--port", "99999", "--checkpoint", "m"]) == 2
    assert "port:" in capsys.readouterr().err


# ---------------------------------------------------------------- model.endpoint in a job


def _job(**model) -> dict:
    return {"run": {"name": "e"}, "model": model, "seeds": {"source": "s"},
            "rollouts": {"steps": 2}, "output": {"root": "o"}}


def test_an_endpoint_is_a_third_model_source() -> None:
    spec = spec_from_data(_job(endpoint="https://muse.example.com/score"))
    m = spec.model
    assert (m.api_key_env, m.max_concurrency, m.timeout_s) == ("MUSE_API_KEY", 16, 60.0)
    for both in ({"endpoint": "https://h/score", "checkpoint": "c"},
                 {"endpoint": "https://h/score", "preset": "tiny"}):
        with pytest.raises(UserError, match="exactly one of"):
            spec_from_data(_job(**both))


@pytest.mark.parametrize(("model", "extra", "message"), [
    ({"endpoint": "https://user:pw@h/score"}, {}, "carries credentials"),
    ({"endpoint": "https://h/score?code=pw"}, {}, "must not have a query string"),
    ({"endpoint": "https://h/score#pw"}, {}, "must not have a query string or fragment"),
    ({"endpoint": "ftp://h/score"}, {}, "http:// or https://"),
    ({"endpoint": "https:///score"}, {}, "with a host"),
    ({"endpoint": "https://h/s", "api_key_env": "MY KEY"}, {}, "api_key_env"),
    ({"endpoint": "https://h/s"}, {"rollouts": {"steps": 2, "mode": "policy"}},
     "policy needs a local model"),
    ({"endpoint": "https://h/s"}, {"resources": {"gpus_per_actor": 1}}, "need no GPU"),
])
def test_bad_endpoint_settings_are_refused(model: dict, extra: dict, message: str) -> None:
    data = {**_job(**model), **extra}
    data["seeds"] = {"source": "s", "format": "wham-npz"}
    with pytest.raises(UserError, match=message) as info:
        spec_from_data(data)
    assert "pw" not in str(info.value)


@pytest.fixture
def answering() -> Iterator[dict]:
    """A loopback server answering every request with `state["status"]` (and
    `state["location"]` as Location when set), no body."""
    with scripted_server(status=400) as state:
        yield state


def test_preflight_checks_the_key_variable_and_the_endpoint(
        answering: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    url = answering["url"]
    monkeypatch.delenv("MUSE_API_KEY", raising=False)
    with pytest.raises(UserError, match="MUSE_API_KEY is not set"):
        check_endpoint(url, api_key_env="MUSE_API_KEY", timeout_s=5)
    monkeypatch.setenv("MUSE_API_KEY", "k-preflight")
    check_endpoint(url, api_key_env="MUSE_API_KEY", timeout_s=5)  # 400: it is there
    assert answering["seen"][-1][2] == "Bearer k-preflight"
    check_endpoint(url, api_key_env=None, timeout_s=5)
    assert answering["seen"][-1][2] is None
    for status, message in ((401, "refused the key"), (403, "refused the key"),
                            (404, "answered 404")):
        answering["status"] = status
        with pytest.raises(UserError, match=message):
            check_endpoint(url, api_key_env="MUSE_API_KEY", timeout_s=5)
    answering["status"] = 503  # busy, but there
    check_endpoint(url, api_key_env="MUSE_API_KEY", timeout_s=5)
    with pytest.raises(UserError, match="cannot reach"):
        check_endpoint(f"http://127.0.0.1:{free_port()}/score", api_key_env=None, timeout_s=5)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_preflight_does_not_follow_a_redirect(answering: dict, status: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A redirect would carry the key to wherever it points: it is reported, not followed."""
    monkeypatch.setenv("MUSE_API_KEY", "k-preflight")
    answering["status"] = status
    answering["location"] = answering["url"].replace("/score", "/v2/score?sig=hidden")
    with pytest.raises(UserError, match=rf"HTTP {status}, a redirect to .*/v2/score; "
                                        "redirects are not followed") as info:
        check_endpoint(answering["url"], api_key_env="MUSE_API_KEY", timeout_s=5)
    # one request: nothing followed
    assert [auth for _, _, auth in answering["seen"]] == ["Bearer k-preflight"]
    assert "hidden" not in str(info.value)


def test_preflight_masks_the_named_key_variable(
        answering: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFLIGHT_MUSE_TOKEN", "tok-preflight-51c0e2")
    assert redact("key tok-preflight-51c0e2") == "key tok-preflight-51c0e2"
    check_endpoint(answering["url"], api_key_env="PREFLIGHT_MUSE_TOKEN", timeout_s=5)
    assert redact("key tok-preflight-51c0e2") == f"key {REDACTED}"


def test_a_named_key_variable_is_masked_in_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_MUSE_TOKEN", "tok-3f9a8b7c6d")
    assert "tok-3f9a8b7c6d" in redact("key tok-3f9a8b7c6d")
    add_secret_env("TEAM_MUSE_TOKEN")
    assert redact("key tok-3f9a8b7c6d") == f"key {REDACTED}"
