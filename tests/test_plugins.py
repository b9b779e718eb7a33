"""The plugin contract, exercised through real entry points (built-ins and the
third-party example package installed from tests/plugin_example)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from zooscan import hookimpl, plugins
from zooscan.cli import build_cli
from zooscan.errors import PluginError, UserError
from zooscan.records import FirstLayer, Source

BUILT_INS = {"torchvision", "files", "image_datasets", "cifar"}


def test_every_plugin_is_listed_with_hooks_and_version():
    infos = {p.name: p for p in plugins.list_plugins()}
    assert BUILT_INS | {"gabor"} <= set(infos)
    assert infos["torchvision"].hooks == ("register_sources",)
    assert infos["image_datasets"].hooks == ("register_datasets",)
    assert infos["gabor"].hooks == ("register_commands", "register_sources")
    assert infos["gabor"].package == "zooscan-example-gabor"
    assert infos["gabor"].version == "0.3.0"
    assert infos["files"].package == "zooscan"


def test_plugins_command_json_lists_hooks():
    result = CliRunner().invoke(build_cli(), ["plugins", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert rows["gabor"]["hooks"] == ["register_commands", "register_sources"]
    assert rows["gabor"]["version"] == "0.3.0"


def test_third_party_source_through_the_entry_point():
    source = plugins.get_source("gabor", {})
    assert isinstance(source, Source)
    names = [ref.name for ref in source.list_models(["gabor-7x7-*"])]
    assert names == ["gabor-7x7-low", "gabor-7x7-high"]
    layer = source.load_first_layer(next(iter(source.list_models(["gabor-7x7-low"]))))
    assert isinstance(layer, FirstLayer)
    assert layer.weight.shape == (16, 3, 7, 7)


def test_source_options_are_validated_by_the_source():
    with pytest.raises(UserError, match="unknown option"):
        plugins.get_source("gabor", {"colour": "blue"})


def test_unknown_source_is_a_user_error():
    with pytest.raises(UserError, match="unknown source 'nope'.*gabor"):
        plugins.get_source("nope")


def test_load_plugins_env_restricts_what_loads(monkeypatch):
    monkeypatch.setenv("ZOOSCAN_LOAD_PLUGINS", "gabor, image_datasets")
    plugins.reset()
    assert {p.name for p in plugins.list_plugins()} == {"gabor", "image_datasets"}
    assert list(plugins.sources()) == ["gabor"]
    result = CliRunner().invoke(build_cli(), ["sources", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert {row["name"] for row in json.loads(result.output) if row["kind"] == "source"} == {
        "gabor"
    }


def test_load_plugins_env_empty_loads_none(monkeypatch):
    monkeypatch.setenv("ZOOSCAN_LOAD_PLUGINS", "")
    plugins.reset()
    assert plugins.list_plugins() == []
    with pytest.raises(UserError, match="none installed"):
        plugins.get_source("torchvision")


def test_load_plugins_env_unknown_name_is_an_error(monkeypatch):
    monkeypatch.setenv("ZOOSCAN_LOAD_PLUGINS", "gabor,not-a-plugin")
    with pytest.raises(PluginError, match="not-a-plugin"):
        plugins.new_plugin_manager()


class MisspeltHook:
    @hookimpl
    def register_source(self, register):  # not a zooscan hook
        pass


class WrongArguments:
    @hookimpl
    def register_sources(self, register, extra):  # hookspec has only `register`
        pass


def test_hook_that_matches_no_hookspec_is_rejected(monkeypatch):
    monkeypatch.setenv("ZOOSCAN_LOAD_PLUGINS", "")
    with pytest.raises(PluginError, match="'misspelt'.*does not define.*register_source"):
        plugins.new_plugin_manager(extra={"misspelt": MisspeltHook()})


def test_hook_with_wrong_arguments_is_rejected(monkeypatch):
    monkeypatch.setenv("ZOOSCAN_LOAD_PLUGINS", "")
    with pytest.raises(PluginError, match="'wrong'"):
        plugins.new_plugin_manager(extra={"wrong": WrongArguments()})


class Twin:
    name = "gabor"
    description = "registers a name that is taken"


class TwinPlugin:
    @hookimpl
    def register_sources(self, register):
        register(Twin)


def test_two_plugins_registering_one_name_is_an_error():
    pm = plugins.new_plugin_manager(extra={"twin": TwinPlugin()})
    with pytest.raises(PluginError, match="two plugins register the name 'gabor'"):
        plugins.sources(pm)


def test_plugin_command_is_added_to_the_cli():
    result = CliRunner().invoke(build_cli(), ["gabor-info", "5"])
    assert result.exit_code == 0, result.output
    assert "gabor bank 5x5: (16, 3, 5, 5)" in result.output


def test_register_datasets_contract():
    factories = plugins.datasets()
    assert {"synthetic", "folder", "cifar10", "cifar100"} <= set(factories)
    for factory in factories.values():
        assert factory.description
    dataset = plugins.open_dataset("synthetic")
    assert dataset.key.startswith("synthetic")
    with pytest.raises(UserError, match="unknown dataset"):
        plugins.open_dataset("imagenet-on-a-floppy")
