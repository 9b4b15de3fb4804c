from pathlib import Path

import pytest

from app.settings import AppSettings


def test_defaults_environment_and_flags():
    assert AppSettings.from_args([], environ={}) == AppSettings()
    env = {"MEMCHAT_PORT": "9000", "MEMCHAT_ALLOW_SIGNUP": "false", "MEMCHAT_DATA_DIR": "/srv/memchat"}
    settings = AppSettings.from_args([], environ=env)
    assert (settings.port, settings.allow_signup, settings.data_dir) == (9000, False, Path("/srv/memchat"))
    settings = AppSettings.from_args(["--port", "9001", "--allow-signup", "--compress-every", "8"], environ=env)
    assert (settings.port, settings.allow_signup, settings.compress_every) == (9001, True, 8)


def test_a_bad_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        AppSettings.from_args(["--port", "many"], environ={})
    assert "--port" in capsys.readouterr().err


def test_the_admin_password_is_never_a_flag_nor_printed(capsys, tmp_path):
    env = {"MEMCHAT_ADMIN_PASSWORD": "hunter2-very-secret"}
    with pytest.raises(SystemExit):
        AppSettings.from_args(["--help"], environ=env)
    shown = capsys.readouterr().out
    assert "hunter2" not in shown and "MEMCHAT_ADMIN_PASSWORD" in shown
    capsys.readouterr()
    for argv in (["--admin-password", "hunter2"], ["--admin-password=hunter2"], ["hunter2"]):
        with pytest.raises(SystemExit):  # a flag would show in `ps`; no abbreviation of --admin-password-file
            AppSettings.from_args(argv, environ={})
        error = capsys.readouterr().err
        assert "hunter2" not in error
        assert error.strip().splitlines()[-1].endswith("unrecognized arguments: " + (
            "--admin-password (values not shown)" if argv[0].startswith("-") else "values that are not flags (values not shown)"))
    settings = AppSettings.from_args(["--admin-username", "root"], environ=env)
    assert settings.admin_password == "hunter2-very-secret" and "hunter2" not in repr(settings)
    secret = tmp_path / "admin-password"
    secret.write_text("from a file\n")
    assert AppSettings.from_args(["--admin-password-file", str(secret)], environ={}).admin_password == "from a file"
    with pytest.raises(SystemExit):
        AppSettings.from_args(["--admin-password-file", str(tmp_path / "missing")], environ={})


def test_rate_limits_are_settings_checked_when_read(capsys):
    settings = AppSettings.from_args(["--messages-per-user", "30/minute"], environ={})
    assert settings.messages_per_user == "30/minute"
    with pytest.raises(SystemExit):
        AppSettings.from_args(["--signups-per-address", "lots"], environ={})


def test_a_database_password_is_not_printed(capsys):
    env = {"MEMCHAT_DATABASE_URL": "postgresql+psycopg://memchat:s3cret-pw@db.example/memchat"}
    with pytest.raises(SystemExit):
        AppSettings.from_args(["--help"], environ=env)
    shown = capsys.readouterr().out
    assert "s3cret-pw" not in shown and "memchat:***@db.example" in shown


def test_settings_and_the_loading_page_import_nothing_heavy_and_share_the_engines_defaults():
    """app.py reads its settings and answers the port with the loading page before it imports the
    model code, which takes seconds: neither may pull it in. Their copies of its defaults agree."""
    import subprocess
    import sys

    from adapter_core.memory.compressor import COMPRESSORS
    from adapter_core.serving.sampling import SamplingConfig
    from app import settings
    from storage.settings import SNAPSHOT_STORES

    heavy = ("torch", "transformers", "gradio", "sqlalchemy", "adapter_core", "storage")
    script = ("import sys; import app.settings, app.loading; app.settings.AppSettings.from_args([]); "
              f"print([m for m in {heavy!r} if m in sys.modules])")
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[2])
    assert imported.stdout.strip() == "[]", imported.stderr
    assert settings.COMPRESSORS == COMPRESSORS and settings.MAX_NEW_TOKENS == SamplingConfig.max_new_tokens
    assert settings.SNAPSHOT_STORES == SNAPSHOT_STORES
