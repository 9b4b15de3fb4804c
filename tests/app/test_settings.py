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
