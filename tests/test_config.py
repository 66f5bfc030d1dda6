"""The access and limit flags (issue 13): environment variables, secrets kept out of --help,
and the objects the server builds from them."""

import contextlib
import io
import os

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


# --- every value checked at parse time (audit 2) ---------------------------------------------------


def parse_error(argv: list[str], environ: dict | None = None, capsys=None) -> str:
    """The one-line error parse_args ends with (exit status 2, argparse's for a bad flag)."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv, environ or {})
    assert exited.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("server.py: error: ")
    return line


def test_every_number_flag_has_a_range():
    from dia2stream.serve.config import _BOUNDS, _FLAGS

    numbers = {name for name, kind, _ in _FLAGS if kind in (int, float)}
    assert numbers - set(_BOUNDS) == set(), "a number flag without a range"
    assert set(_BOUNDS) - numbers == set()


@pytest.mark.parametrize("flag, value", [
    ("--max-lead-ms", "-100"), ("--max-lead-ms", "0"), ("--max-lead-ms", "nan"), ("--max-lead-ms", "inf"),
    ("--port", "-1"), ("--port", "70000"), ("--http-port", "70000"), ("--http-port", "-1"), ("--agent-port", "70000"),
    ("--threads", "-2"), ("--context-frames", "-5"), ("--commands-per-second", "0"), ("--commands-per-second", "nan"),
    ("--command-burst", "0"), ("--max-command-bytes", "0"), ("--max-command-bytes", "1023"),
    ("--max-voice-message-bytes", "-1"), ("--max-voice-message-bytes", str(10**9)),
    ("--idle-timeout-s", "-1"), ("--ping-interval-s", "-1"), ("--max-voice-seconds", "-1"),
    ("--max-voice-seconds", "0"), ("--max-voices-per-connection", "-1"), ("--voice-cache-mb", "-1"),
    ("--ping-timeout-s", "0"), ("--ping-timeout-s", "-1"), ("--cfg-scale", "-1"), ("--cfg-scale", "nan"),
    ("--seed", "-1"), ("--overload-refusal-s", "nan"), ("--engine-stall-s", "nan"), ("--flood-close-s", "nan"),
    ("--max-user-turn-seconds", "inf"), ("--max-user-turn-seconds", "0"), ("--drain-timeout-s", "inf"),
    ("--lead-in-frames", "-1"), ("--rollover-frames", "-1"), ("--max-calls", "0"), ("--compile-max-calls", "0"),
    ("--max-pending-text-chars", "10"),
])
def test_a_value_out_of_range_is_a_one_line_error_naming_the_flag(flag, value, capsys):
    line = parse_error([flag, value], capsys=capsys)
    assert line.startswith(f"server.py: error: {flag} ") and "must be" in line, line
    if value in ("nan", "inf"):
        assert "finite" in line


def test_an_environment_variable_out_of_range_is_named_as_such(capsys):
    line = parse_error([], {"DIA2_MAX_LEAD_MS": "-100"}, capsys)
    assert line.startswith("server.py: error: DIA2_MAX_LEAD_MS -100.0: must be more than 0"), line
    assert parse_args(["--max-lead-ms", "500"], {"DIA2_MAX_LEAD_MS": "-100"}).max_lead_ms == 500.0  # the flag wins


@pytest.mark.parametrize("argv", [
    ["--context-frames", "0"], ["--threads", "0"], ["--idle-timeout-s", "0"], ["--ping-interval-s", "0"],
    ["--flood-close-s", "0"], ["--overload-refusal-s", "0"], ["--engine-stall-s", "0"], ["--drain-timeout-s", "0"],
    ["--rollover-frames", "0"], ["--voice-cache-mb", "0"], ["--max-voices-per-connection", "0"],
    ["--max-voice-message-bytes", "0"], ["--port", "0"], ["--port", "65535"], ["--http-port", "0"],
    ["--agent-port", "0"], ["--max-lead-ms", "1e6"], ["--lead-in-frames", "0"], ["--cfg-scale", "1"],
    ["--context-frames", "100000"],  # more than the model's limit: clamped with a warning once it is loaded
])
def test_documented_special_values_still_work(argv):
    parse_args(argv, {})


@pytest.mark.parametrize("argv, env, listed", [
    (["--compile", "bogus"], {}, "expected one of auto, on, off"),
    ([], {"DIA2_COMPILE": "bogus"}, "expected one of auto, on, off"),
    (["--log-level", "LOUD"], {}, "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ([], {"DIA2_LOG_LEVEL": "LOUD"}, "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (["--dtype", "fp64"], {}, "expected one of bf16, bfloat16, fp32, float32, fp16, float16"),
    (["--device", "tpu"], {}, "expected cpu, cuda or cuda:N"),
    (["--kernels", "cuda"], {}, "expected one of auto, torch, triton"),
])
def test_an_invalid_choice_lists_the_valid_ones(argv, env, listed, capsys):
    line = parse_error(argv, env, capsys)
    assert listed in line, line


def test_choices_that_are_accepted():
    config = parse_args(["--log-level", "debug", "--dtype", "fp16", "--device", "cuda:1"], {})
    assert (config.log_level, config.dtype, config.device) == ("DEBUG", "fp16", "cuda:1")
    assert parse_args([], {}).log_level == "INFO"


def test_the_dtype_choices_are_the_ones_the_model_loader_takes():
    from vendor_dia2.api import _parse_dtype

    from dia2stream.serve.config import Dtype

    for name in Dtype:
        _parse_dtype(str(name))
    with pytest.raises(ValueError):
        _parse_dtype("fp64")


@pytest.mark.parametrize("argv, env, said", [
    (["--simulate-gpu", "missing.json"], {}, "--simulate-gpu missing.json: no such file"),
    (["--auth-token-file", "/nonexist"], {}, "--auth-token-file /nonexist: no such file"),
    (["--auth-token", ""], {}, "--auth-token is empty"),
    (["--auth-token", "  "], {}, "--auth-token is empty"),
    ([], {"DIA2_AUTH_TOKEN": ""}, "DIA2_AUTH_TOKEN is empty"),
    (["--tls-cert", "/etc/hostname"], {}, "--tls-cert and --tls-key go together"),
    (["--tls-cert", "/etc/hostname", "--tls-key", "/nonexist"], {}, "--tls-key /nonexist: no such file"),
    (["--voice", "bad"], {}, "--voice 'bad': expected NAME=PATH[,TRANSCRIPT]"),
    (["--voice", "a b=x.wav"], {}, "the name must be"),
    ([], {"DIA2_VOICE": "=x.wav"}, "expected NAME=PATH[,TRANSCRIPT]"),
    (["--voice-dir", "/nonexist/voices"], {}, "--voice-dir /nonexist/voices: no such folder"),
    (["--compile-cache", "/etc/hostname"], {}, "--compile-cache /etc/hostname: not a folder"),
    ([], {"DIA2_COMPILE_CACHE": "/etc/hostname/sub"}, "DIA2_COMPILE_CACHE /etc/hostname/sub: cannot be made (/etc/hostname is not a folder)"),
])
def test_files_and_specs_are_checked_at_parse_time(argv, env, said, capsys):
    line = parse_error(argv, env, capsys)
    assert said in line, line


def test_a_token_flag_overrides_the_other_token_env_var(tmp_path, capsys):
    """The environment gives the flags' defaults (docs/operations.md): `--auth-token-file` on the
    command line replaces a DIA2_AUTH_TOKEN from the environment, and the other way round; both
    on the command line, or both in the environment, stays an error."""
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    config = parse_args(["--auth-token-file", str(secret)], {"DIA2_AUTH_TOKEN": "from-env"})
    assert (config.auth_token, config.auth_token_file) == (None, str(secret))
    assert HttpPolicy.from_config(config).auth_token == "from-file"
    config = parse_args(["--auth-token", "from-flag"], {"DIA2_AUTH_TOKEN_FILE": str(secret)})
    assert (config.auth_token, config.auth_token_file) == ("from-flag", None)
    assert HttpPolicy.from_config(config).auth_token == "from-flag"
    line = parse_error(["--auth-token", "a", "--auth-token-file", str(secret)], {}, capsys)
    assert "give --auth-token or --auth-token-file, not both" in line
    line = parse_error([], {"DIA2_AUTH_TOKEN": "a", "DIA2_AUTH_TOKEN_FILE": str(secret)}, capsys)
    assert "give DIA2_AUTH_TOKEN or DIA2_AUTH_TOKEN_FILE, not both" in line


def test_an_unreadable_token_file_is_one_line(tmp_path):
    from dia2stream.serve.http import load_auth_token

    with pytest.raises(ValueError, match=r"^--auth-token-file .*: Is a directory$"):
        load_auth_token(None, str(tmp_path))


def help_text() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"], {})
    return " ".join(out.getvalue().split())


def test_help_says_what_each_size_limit_covers_and_what_context_frames_0_means():
    text = help_text()
    assert "largest message other than a set_voice or user_turn with audio" in text
    assert "largest set_voice or user_turn message with base64 audio" in text
    context = text.split("--context-frames CONTEXT_FRAMES")[-1].split("--threads THREADS")[0]  # the flag, not usage
    assert "0 = the model's limit" in context and "clamped" in context


def test_compiled_kernels_are_kept_under_the_cache_folder_unless_torch_or_triton_is_told_otherwise(
        monkeypatch, tmp_path):
    from dia2stream.serve.build import use_compile_cache

    monkeypatch.setenv("DIA2_CACHE", str(tmp_path / "dia2"))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    use_compile_cache(None)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "dia2" / "compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "dia2" / "compile" / "triton")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    use_compile_cache(str(tmp_path / "kept"))  # the flag names the folder; torch's own variable still wins
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "kept" / "triton")
