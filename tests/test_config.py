"""The access and limit flags (issue 13): environment variables, secrets kept out of --help,
and the objects the server builds from them."""

import contextlib
import io

import pytest

from dia2stream.serve.config import ServerConfig, parse_args
from dia2stream.serve.http import HttpPolicy
from dia2stream.serve.limits import Limits


def test_defaults_build_valid_limits_and_an_open_loopback_policy():
    config = parse_args([], {})
    limits = Limits.from_config(config)
    assert limits.max_command_bytes == 64 * 1024 and limits.websocket_settings()["compression"] is None
    policy = HttpPolicy.from_config(config)
    assert policy.auth_token is None and policy.allowed_origins is None


def test_env_and_flags(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    env = {"DIA2_AUTH_TOKEN_FILE": str(secret), "DIA2_ALLOWED_ORIGINS": "https://a.example,https://b.example",
           "DIA2_COMMANDS_PER_SECOND": "7.5", "DIA2_COMMAND_BURST": "9", "DIA2_IDLE_TIMEOUT_S": "0",
           "DIA2_MAX_VOICE_MESSAGE_BYTES": "0", "DIA2_VOICE_CACHE_MB": "10"}
    config = parse_args(["--max-voices-per-connection", "2", "--ping-interval-s", "5"], env)
    assert (config.commands_per_second, config.command_burst, config.idle_timeout_s) == (7.5, 9, 0.0)
    assert (config.max_voices_per_connection, config.ping_interval_s, config.voice_cache_mb) == (2, 5.0, 10)
    policy = HttpPolicy.from_config(config)
    assert policy.auth_token == "from-file"
    assert policy.allowed_origins == ("https://a.example", "https://b.example")
    limits = Limits.from_config(config)
    assert limits.max_message_bytes == limits.max_command_bytes  # no inline voice audio
    assert limits.websocket_settings()["ping_interval"] == 5.0


def test_token_from_env_is_not_shown_by_help_or_repr():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"], {"DIA2_AUTH_TOKEN": "sekrit-value"})
    assert "sekrit-value" not in out.getvalue() and "DIA2_AUTH_TOKEN" in out.getvalue()
    config = parse_args([], {"DIA2_AUTH_TOKEN": "sekrit-value"})
    assert config.auth_token == "sekrit-value" and "sekrit-value" not in repr(config)


def test_inconsistent_limits_are_refused():
    with pytest.raises(ValueError):
        Limits.from_config(ServerConfig(commands_per_second=0))
    with pytest.raises(ValueError):
        HttpPolicy.from_config(ServerConfig(auth_token="a", auth_token_file="/dev/null"))


def test_operations_doc_table_matches_the_flags_and_defaults():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = doc.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `--([a-z-]+)` \| `(DIA2_[A-Z_]+)` \| ([^|]+) \|", section, re.M)
    defaults = ServerConfig()
    documented = {}
    for flag, env, default in rows:
        name = flag.replace("-", "_")
        assert env == "DIA2_" + name.upper()
        documented[name] = default.strip()
    access_and_limits = ["auth_token", "auth_token_file", "allowed_origins", "max_command_bytes",
                         "max_voice_message_bytes", "commands_per_second", "command_burst", "flood_close_s",
                         "max_pending_text_chars", "idle_timeout_s", "ping_interval_s", "ping_timeout_s",
                         "max_voices_per_connection", "voice_cache_mb"]
    assert list(documented) == access_and_limits
    for name, shown in documented.items():
        value = getattr(defaults, name)
        assert shown == ("none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)), name


@pytest.mark.parametrize("flag, device, simulated, expected", [
    ("auto", "cpu", False, False),  # on a CPU the step runs in the host's thread: nothing to overlap
    ("auto", "cpu", True, True),  # the simulated GPU runs apart from the host
    ("auto", "cuda", False, True),
    ("on", "cpu", False, True),
    ("off", "cuda", False, False),
])
def test_a_step_in_flight_by_default_wherever_a_device_runs_apart_from_the_host(flag, device, simulated, expected):
    config = parse_args(["--step-in-flight", flag] + (["--simulate-gpu", "profiles/h200-2b.json"] if simulated else []))
    assert config.engine_config(device).step_in_flight is expected
    assert config.engine_config(device).decode_stream is True  # on unless asked off (no effect without CUDA graphs)
