"""Settings: precedence of the environment and the original's env files, and hostile values."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktulhu.settings import JWT_SECRET_FILE, SettingsError, ensure_jwt_secret, load_settings, setting_fields

GOOD_SECRET = "s" * 40


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_defaults_with_nothing_configured(tmp_path: Path) -> None:
    s = load_settings(environ={}, root=tmp_path)
    assert (s.host, s.port, s.db_path, s.env) == ("0.0.0.0", 3000, "chatdb", "development")
    assert s.ctx_pool == 4 and s.n_slots == 4 and s.queue == 64 and s.engine_workers == 1
    assert s.model_file == tmp_path / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert s.sources == {}
    assert not s.payments_enabled and not s.google_enabled and not s.apple_enabled


def test_precedence_env_over_dotenv_over_payment_over_llamacpp(tmp_path: Path) -> None:
    write(tmp_path, "config/llamacpp.env", "LLAMA_CLI_CTX=1000\nLLAMA_CLI_TOP_K=10\nLLAMA_CLI_TEMP=0.1\n"
                                           "LLAMA_CLI_TOP_P=0.5\n")
    write(tmp_path, "config/payment.env", "LLAMA_CLI_CTX=2000\nLLAMA_CLI_TOP_K=20\nLLAMA_CLI_TEMP=0.2\n")
    write(tmp_path, ".env", "LLAMA_CLI_CTX=3000\nLLAMA_CLI_TOP_K=30\n")
    s = load_settings(environ={"LLAMA_CLI_CTX": "4000"}, root=tmp_path)
    assert (s.ctx, s.top_k, s.temperature, s.top_p) == (4000, 30, 0.2, 0.5)
    assert s.sources["LLAMA_CLI_CTX"] == "environment"
    assert s.sources["LLAMA_CLI_TOP_K"] == ".env"
    assert s.sources["LLAMA_CLI_TEMP"] == "config/payment.env"
    assert s.sources["LLAMA_CLI_TOP_P"] == "config/llamacpp.env"


def test_env_files_tolerate_comments_indentation_and_empty_values(tmp_path: Path) -> None:
    write(tmp_path, "config/llamacpp.env", "  LLAMA_CLI_CTX=1234   # per slot\n# LLAMA_CLI_TOP_K=1\n"
                                           "LLAMA_CLI_THREADS=\nGOOGLE_CLIENT_ID=\n")
    s = load_settings(environ={}, root=tmp_path)
    assert s.ctx == 1234 and s.top_k == 40 and s.threads is None and not s.google_enabled


def test_shipped_llamacpp_env_is_valid(repo_root: Path) -> None:
    s = load_settings(environ={}, root=repo_root)
    assert s.sources["LLAMA_CLI_MODEL"] == "config/llamacpp.env"
    assert s.model_path == "models/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_command_line_overrides_win(tmp_path: Path) -> None:
    s = load_settings(environ={"KTULHU_PORT": "1"}, root=tmp_path, port=8080, host=None)
    assert s.port == 8080 and s.sources["KTULHU_PORT"] == "command line" and s.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("LLAMA_CLI_CTX_POOL", "0", "LLAMA_CLI_CTX_POOL='0'"),
        ("LLAMA_CLI_TEMP", "abc", "LLAMA_CLI_TEMP='abc'"),
        ("LLAMA_CLI_TEMP", "nan", "out of range"),
        ("LLAMA_CLI_TOP_P", "1.5", "from 0.0 to 1.0"),
        ("KTULHU_PORT", "70000", "KTULHU_PORT='70000'"),
        ("KTULHU_PORT", "3000; rm -rf /", "not a whole number"),
        ("KTULHU_ENV", "prod", "development, production"),
        ("KTULHU_LOG", "verbose", "unknown log level"),
        ("KTULHU_HOST", "0.0.0.0 evil", "not a host name"),
        ("STRIPE_SUCCESS_URL", "javascript:alert(1)", "not an http(s) URL"),
        ("INTENT_ROUTER_DEVICE", "tpu", "auto, cpu, cuda"),
        ("KTULHU_DB_SYNC", "maybe", "set 1 or 0"),
        ("LLAMA_CLI_MODEL", "models/x\x00.gguf", "NUL"),
    ],
)
def test_hostile_values_name_variable_value_and_fix(tmp_path: Path, name: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={name: value}, root=tmp_path)
    text = str(caught.value)
    assert name in text and fragment in text and "(from environment)" in text
    assert "; set" in text or "; use" in text or "; remove" in text


def test_every_problem_is_reported_at_once_with_its_file(tmp_path: Path) -> None:
    write(tmp_path, "config/llamacpp.env", "LLAMA_CLI_CTX_POOL=0\nLLAMA_CLI_TEMP=abc\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"KTULHU_PORT": "-1"}, root=tmp_path)
    problems = caught.value.problems
    assert len(problems) == 3
    assert any("LLAMA_CLI_CTX_POOL='0' (from config/llamacpp.env)" in p for p in problems)


def test_production_requires_a_long_jwt_secret(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="KTULHU_ENV=production requires it"):
        load_settings(environ={"KTULHU_ENV": "production"}, root=tmp_path)
    with pytest.raises(SettingsError, match="shorter than 32 bytes") as caught:
        load_settings(environ={"KTULHU_ENV": "production", "JWT_SECRET": "short-secret"}, root=tmp_path)
    assert "short-secret" not in str(caught.value)  # never echo a secret
    s = load_settings(environ={"KTULHU_ENV": "production", "JWT_SECRET": GOOD_SECRET}, root=tmp_path)
    assert s.jwt_secret == GOOD_SECRET


def test_production_ignores_a_generated_development_secret(tmp_path: Path) -> None:
    write(tmp_path, JWT_SECRET_FILE, "g" * 64)
    with pytest.raises(SettingsError, match="requires it"):
        load_settings(environ={"KTULHU_ENV": "production"}, root=tmp_path)


def test_development_secret_generated_once_private_and_reused(tmp_path: Path) -> None:
    s = load_settings(environ={}, root=tmp_path)
    assert s.jwt_secret == ""
    s1, created = ensure_jwt_secret(s)
    assert created and len(s1.jwt_secret) >= 32
    file = tmp_path / JWT_SECRET_FILE
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    s2 = load_settings(environ={}, root=tmp_path)
    assert s2.jwt_secret == s1.jwt_secret and s2.sources["JWT_SECRET"].startswith("generated")
    assert ensure_jwt_secret(s2) == (s2, False)


def test_router_dir_precedence_and_rust_log_fallback(tmp_path: Path) -> None:
    s = load_settings(environ={"PHATIC_MODEL_DIR": "legacy", "RUST_LOG": "debug"}, root=tmp_path)
    assert s.router_dir == tmp_path / "legacy" and s.log == "debug"
    assert s.sources["KTULHU_LOG"] == "environment (RUST_LOG)"
    s = load_settings(environ={"PHATIC_MODEL_DIR": "legacy", "INTENT_ROUTER_DIR": "/abs/router"}, root=tmp_path)
    assert s.router_dir == Path("/abs/router")
    assert load_settings(environ={"INTENT_ROUTER_PHATIC": "0"}, root=tmp_path).router_phatic is False
    assert load_settings(environ={"INTENT_ROUTER_PHATIC": "no"}, root=tmp_path).router_phatic is True


def test_slots_default_to_ctx_pool(tmp_path: Path) -> None:
    assert load_settings(environ={"LLAMA_CLI_CTX_POOL": "3"}, root=tmp_path).n_slots == 3
    assert load_settings(environ={"LLAMA_CLI_CTX_POOL": "3", "KTULHU_SLOTS": "8"}, root=tmp_path).n_slots == 8


def test_runtime_check_names_missing_model_and_fix(tmp_path: Path) -> None:
    s = load_settings(environ={"LLAMA_CLI_MODEL": "models/nope.gguf"}, root=tmp_path)
    with pytest.raises(SettingsError) as caught:
        s.check_runtime()
    text = str(caught.value)
    assert "LLAMA_CLI_MODEL='models/nope.gguf' (environment)" in text
    assert "run `ktulhu models pull` or set LLAMA_CLI_MODEL" in text
    assert "CHAT_TEMPLATE_PATH" not in text  # `auto`: the model's own template needs no file


def test_runtime_check_names_a_missing_template_file(tmp_path: Path) -> None:
    s = load_settings(environ={"CHAT_TEMPLATE_PATH": "my.jinja"}, root=tmp_path)
    with pytest.raises(SettingsError, match="CHAT_TEMPLATE_PATH='my.jinja'"):
        s.check_runtime()


def test_runtime_check_passes_in_a_checkout(server_dir: Path) -> None:
    load_settings(environ={}, root=server_dir).check_runtime()


def test_runtime_check_reports_explicit_router_dir(server_dir: Path) -> None:
    s = load_settings(environ={"INTENT_ROUTER_DIR": "nowhere"}, root=server_dir)
    with pytest.raises(SettingsError, match="INTENT_ROUTER_DIR='nowhere'"):
        s.check_runtime()


def test_public_items_mask_secrets_and_cover_every_variable(tmp_path: Path) -> None:
    env = {"JWT_SECRET": GOOD_SECRET, "STRIPE_SECRET_KEY": "sk_test_abcdefgh", "STRIPE_PUBLISHABLE_KEY": "pk",
           "STRIPE_PRICE_ID": "price_1"}
    s = load_settings(environ=env, root=tmp_path)
    rows = {env_name: (value, source) for env_name, value, source in s.public_items()}
    assert rows["JWT_SECRET"] == ("***(40 chars)", "environment")
    assert "sk_test" not in rows["STRIPE_SECRET_KEY"][0]
    assert rows["STRIPE_PRICE_ID"] == ("price_1", "environment")
    assert s.payments_enabled
    original = {"JWT_SECRET", "GOOGLE_CLIENT_ID", "APPLE_CLIENT_ID", "LLAMA_CLI_BIN", "LLAMA_CLI_MODEL",
                "LLAMA_CLI_CTX", "LLAMA_CLI_CTX_POOL", "LLAMA_CLI_MAX_TOKENS", "LLAMA_CLI_TEMP", "LLAMA_CLI_TOP_P",
                "LLAMA_CLI_TOP_K", "LLAMA_CLI_NGL", "LLAMA_CLI_THREADS", "INTENT_ROUTER_DIR", "PHATIC_MODEL_DIR",
                "INTENT_ROUTER_PHATIC", "INTENT_ROUTER_SEQ_LEN", "INTENT_ROUTER_DEVICE", "CHAT_TEMPLATE_PATH",
                "STRIPE_SECRET_KEY", "STRIPE_PUBLISHABLE_KEY", "STRIPE_PRICE_ID", "STRIPE_CHECKOUT_MODE",
                "STRIPE_SUCCESS_URL", "STRIPE_CANCEL_URL"}
    assert original <= set(rows)
    assert all(f.metadata["help"] for f in setting_fields())


INT_VARS = ["LLAMA_CLI_CTX", "LLAMA_CLI_CTX_POOL", "KTULHU_PORT", "KTULHU_QUEUE", "LLAMA_CLI_TOP_K"]


@given(name=st.sampled_from(INT_VARS + ["LLAMA_CLI_TEMP", "KTULHU_LOG", "KTULHU_ENV", "KTULHU_HOST"]),
       value=st.text(max_size=40))
def test_arbitrary_values_either_load_or_raise_settings_error(name: str, value: str) -> None:
    root = Path(os.devnull).parent / "nonexistent-ktulhu-root"
    try:
        load_settings(environ={name: value}, root=root)
    except SettingsError as error:
        assert name in str(error)


def test_configuration_doc_lists_every_variable(repo_root: Path) -> None:
    doc = (repo_root / "docs/configuration.md").read_text()
    missing = [f.metadata["env"] for f in setting_fields() if f"`{f.metadata['env']}`" not in doc]
    assert missing == []
