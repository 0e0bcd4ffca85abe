"""Persistent dock-widget settings: JSON file, atomic saves, robust against broken files."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest

from napari_medsam._napari.settings import DEFAULTS, ENV_VAR, Settings, config_dir, settings_path


def test_env_var_chooses_the_folder_and_autouse_fixture_isolates_tests(_isolated_settings, tmp_path, monkeypatch):
    assert config_dir() == _isolated_settings
    assert settings_path() == _isolated_settings / "settings.json"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "other"))
    assert Settings().path == tmp_path / "other" / "settings.json"
    monkeypatch.delenv(ENV_VAR)
    assert config_dir().name == "napari-medsam"


def test_defaults_set_get_and_reload(_isolated_settings):
    settings = Settings()
    assert not settings.path.exists()  # nothing is written before a setting changes
    assert settings.get("device") == "auto" and settings.get("overwrite") is False
    assert settings.get("checkpoints") == {} and settings.get("nonexistent") is None
    assert settings.get("device", "cpu") == "cpu"  # an explicit default wins over the built-in one
    settings.set("model", "mobile_sam")
    settings.set("overwrite", True)
    settings.set("checkpoints", {"mobile_sam": "/data/mobile_sam.pt"})
    on_disk = json.loads(settings.path.read_text(encoding="utf-8"))
    assert on_disk == {"model": "mobile_sam", "overwrite": True, "checkpoints": {"mobile_sam": "/data/mobile_sam.pt"}}
    again = Settings()
    assert again.get("model") == "mobile_sam" and again.get("overwrite") is True
    assert again.get("checkpoints") == {"mobile_sam": "/data/mobile_sam.pt"}
    assert again.as_dict() == on_disk
    # values handed out are copies: changing one does not change the settings
    again.get("checkpoints")["x"] = "y"
    assert again.get("checkpoints") == {"mobile_sam": "/data/mobile_sam.pt"}
    assert sorted(p.name for p in _isolated_settings.iterdir()) == ["settings.json"]  # no temp files left


def test_save_is_atomic_via_os_replace(monkeypatch):
    settings = Settings()
    settings.set("device", "cpu")
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((os.path.dirname(src), str(dst)))
        assert json.loads(open(src, encoding="utf-8").read())["device"] == "cuda"  # complete before the swap
        assert json.loads(settings.path.read_text(encoding="utf-8"))["device"] == "cpu"
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    settings.set("device", "cuda")
    assert calls == [(str(settings.path.parent), str(settings.path))]
    settings.set("device", "cuda")  # unchanged: no write
    assert len(calls) == 1


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe garbage", b""])
def test_corrupt_file_warns_uses_defaults_and_is_kept_until_a_change(content, caplog):
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="napari_medsam._napari.settings"):
        settings = Settings()
    assert settings.broken
    assert any("settings" in r.getMessage() for r in caplog.records)
    assert settings.get("device") == "auto" and settings.get("model", "x") == "x"
    assert path.read_bytes() == content  # reading never rewrites the broken file
    settings.set("device", "cpu")
    assert json.loads(path.read_text(encoding="utf-8")) == {"device": "cpu"}
    assert not settings.broken and Settings().get("device") == "cpu"


def test_unreadable_file_does_not_raise(caplog):
    path = settings_path()
    path.mkdir(parents=True)  # a folder where the file should be: reading fails with an OSError
    with caplog.at_level(logging.WARNING):
        settings = Settings()
        assert settings.get("model", "") == ""
        settings.set("model", "medsam")  # saving fails too: logged, kept in memory
    assert settings.get("model") == "medsam"
    assert sum("settings" in r.getMessage() for r in caplog.records) >= 2


def test_values_of_the_wrong_type_read_as_default(caplog):
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"overwrite": "yes", "checkpoints": ["a"], "device": 3, "custom": [1]}), encoding="utf-8")
    settings = Settings()
    assert not settings.broken
    assert settings.get("overwrite") is False and settings.get("checkpoints") == {}
    assert settings.get("device") == DEFAULTS["device"]
    assert settings.get("custom") == [1]  # keys without a known type are returned as stored


def test_not_json_serialisable_value_is_refused():
    settings = Settings()
    with pytest.raises(TypeError):
        settings.set("model", object())
    assert not settings.path.exists() and settings.get("model") == DEFAULTS["model"]


def test_two_instances_do_not_undo_each_others_changes():
    first, second = Settings(), Settings()
    first.set("model", "medsam")
    second.set("device", "cpu")
    assert json.loads(settings_path().read_text(encoding="utf-8")) == {"model": "medsam", "device": "cpu"}
    assert second.get("model") == "medsam"


def test_concurrent_writers_always_leave_valid_json():
    settings = [Settings() for _ in range(4)]
    errors = []

    def hammer(i: int) -> None:
        try:
            for n in range(25):
                settings[i].set(f"key{i}", n)
                json.loads(settings_path().read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert isinstance(json.loads(settings_path().read_text(encoding="utf-8")), dict)


def test_refinement_and_keys_settings(caplog):
    assert DEFAULTS["refine_from_logits"] is False and DEFAULTS["keys"] == {}
    settings = Settings()
    assert settings.get("refine_from_logits") is False and settings.get("keys") == {}
    settings.set("refine_from_logits", True)
    settings.set("keys", {"cycle_mask": "Shift-C"})
    again = Settings()
    assert again.get("refine_from_logits") is True and again.get("keys") == {"cycle_mask": "Shift-C"}
    # A hand-edited file with the wrong types reads as the defaults.
    again.path.write_text(json.dumps({"refine_from_logits": "yes", "keys": ["Shift-C"]}), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        broken = Settings()
        assert broken.get("refine_from_logits") is False and broken.get("keys") == {}
    assert "refine_from_logits" in caplog.text and "keys" in caplog.text
