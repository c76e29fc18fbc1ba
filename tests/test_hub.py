"""deta.hub: checkpoints by URL or zoo name, downloaded once into TORCH_HOME from a local server, and every
failed download a one-line error that leaves nothing in the cache."""
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from local_http import Routes, serve
from safetensors.torch import save as safetensors_bytes

from deta import hub, zoo
from deta.checkpoint import load_checkpoint
from deta.errors import InputError


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"





def cached(torch_home: Path) -> list[str]:
    """Everything in the hub cache, hidden temporaries included."""
    folder = torch_home / "hub" / "checkpoints"
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


def test_a_url_downloads_once_and_loads_as_the_file(tiny_checkpoint: Path, torch_home: Path) -> None:
    routes = Routes(files={"/runs/ckpt.pth": tiny_checkpoint.read_bytes()})
    with serve(routes) as base:
        url = f"{base}/runs/ckpt.pth"
        first = load_checkpoint(url)
        second = load_checkpoint(url)
    assert routes.requests == {"/runs/ckpt.pth": 1}  # the second load reads the cache
    assert cached(torch_home) == ["ckpt.pth"]
    expected = load_checkpoint(tiny_checkpoint)
    for checkpoint in (first, second):
        assert checkpoint["model"].keys() == expected["model"].keys()
        assert all(torch.equal(checkpoint["model"][k], v) for k, v in expected["model"].items())
        assert checkpoint["args"] == expected["args"]


@pytest.mark.parametrize(("path", "message"), [
    ("/missing.pth", "download of {url} failed (HTTP Error 404: Not Found)"),
    ("/cut.pth", "download of {url}: not a checkpoint (a complete PyTorch or safetensors file), or cut short"),
    ("/page.pth", "download of {url}: not a checkpoint"),
    ("/ckpt.pth#sha256=0123abcd", "download of {base}/ckpt.pth: invalid hash value (expected \"0123abcd\""),
])
def test_a_failed_download_is_one_line_naming_the_url_and_leaves_nothing(
        path: str, message: str, tiny_checkpoint: Path, torch_home: Path) -> None:
    good = tiny_checkpoint.read_bytes()
    routes = Routes(files={"/page.pth": b"<html>Sign in</html>", "/ckpt.pth": good}, cut={"/cut.pth": good})
    with serve(routes) as base, pytest.raises(InputError) as error:
        load_checkpoint(base + path)
    assert str(error.value).startswith(message.format(url=base + path, base=base)) and "\n" not in str(error.value)
    assert cached(torch_home) == []


def test_a_published_hash_is_checked(tiny_checkpoint: Path, torch_home: Path) -> None:
    good = tiny_checkpoint.read_bytes()
    digest = hashlib.sha256(good).hexdigest()
    with serve(Routes(files={"/ckpt.pth": good})) as base:
        with pytest.raises(InputError, match="the only URL fragment understood is #sha256="):
            hub.checkpoint_file(f"{base}/ckpt.pth#md5=00")
        assert hub.checkpoint_file(f"{base}/ckpt.pth#sha256={digest.upper()}") == \
            torch_home / "hub" / "checkpoints" / "ckpt.pth"


def test_a_zoo_name_fetches_an_hf_folder_whole_or_not_at_all(torch_home: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    config = json.dumps({"model_type": "deta"}).encode()
    weights = safetensors_bytes({"x": torch.arange(4.0)})
    routes = Routes(files={"/config.json": config, "/model.safetensors": weights},
                    cut={"/cut.safetensors": weights})
    with serve(routes) as base:
        monkeypatch.setitem(zoo.ZOO, "someone/deta-tiny", zoo.ZooEntry(
            {"config.json": f"{base}/config.json", "model.safetensors": f"{base}/cut.safetensors"}, "cut"))
        with pytest.raises(InputError, match=f"download of {base}/cut.safetensors: not a checkpoint"):
            hub.checkpoint_file("someone/deta-tiny")
        assert cached(torch_home) == []  # not even the config.json that came first
        monkeypatch.setitem(zoo.ZOO, "someone/deta-tiny", zoo.ZooEntry(
            {"config.json": f"{base}/config.json", "model.safetensors": f"{base}/model.safetensors"}, "whole"))
        folder = hub.checkpoint_file("someone/deta-tiny")
    assert folder == torch_home / "hub" / "checkpoints" / "someone--deta-tiny"
    assert cached(torch_home) == ["someone--deta-tiny", "someone--deta-tiny/config.json",
                                  "someone--deta-tiny/model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == weights


def test_a_zoo_name_carries_the_model_flags_its_file_does_not_save(tiny_checkpoint: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bare = io.BytesIO()
    torch.save({"model": torch.load(tiny_checkpoint, weights_only=True)["model"]}, bare)  # no 'args', as detrex
    with serve(Routes(files={"/bare.pth": bare.getvalue()})) as base:
        monkeypatch.setitem(zoo.ZOO, "bare_tiny", zoo.ZooEntry({"bare.pth": f"{base}/bare.pth"}, "tiny",
                                                               {"two_stage": True, "hidden_dim": 64}))
        assert load_checkpoint("bare_tiny")["args"] == {"two_stage": True, "hidden_dim": 64}
        assert "args" not in load_checkpoint(f"{base}/bare.pth")


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(InputError) as error:
        load_checkpoint("deta_r50_typo")
    assert str(error.value) == ("checkpoint deta_r50_typo: no such file, nor an http(s) URL or a model-zoo name "
                                f"(known names: {', '.join(zoo.ZOO)})")


def test_the_zoo_lists_the_published_files() -> None:
    """Every name is in docs/MODEL_ZOO.md, every file an https URL of detrex-storage's releases or the HF Hub."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "MODEL_ZOO.md").read_text()
    for name, entry in zoo.ZOO.items():
        assert f"`{name}`" in doc, name
        assert all(url.startswith(("https://github.com/IDEA-Research/detrex-storage/releases/download/",
                                   "https://huggingface.co/jozhang97/")) for url in entry.files.values())
