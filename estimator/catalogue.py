"""Where models come from: the catalogue, a config.json, a checkpoint folder, or a Hugging Face repo id."""

from __future__ import annotations

import difflib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

from estimator.errors import UserError
from estimator.resources import config_dir
from estimator.spec import ModelSpec

CONFIG_DIR = config_dir()
HF_CACHE = Path(os.environ.get("VRAMCAL_CACHE", Path.home() / ".cache" / "vramcal")) / "hf"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def list_models() -> list[str]:
    """Catalogue names (``configs/models/<name>.json``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read {path} as a JSON config: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a config.json (expected a JSON object)")
    return data


@lru_cache(maxsize=256)
def load_model(model: str) -> ModelSpec:
    """A ModelSpec from a catalogue name, a config.json path, a folder holding one, or an HF repo id.

    A folder that also holds ``*.safetensors`` gives the exact stored bytes per tensor (read from the
    headers only), which is the truth for quantized checkpoints.
    """
    from estimator.families import spec_from_config

    if not model or not model.strip():
        raise UserError("no model given; `vramcal models` lists the catalogue")
    catalogue_file = CONFIG_DIR / f"{model.lower()}.json"
    if catalogue_file.is_file():
        return spec_from_config(read_config(catalogue_file), model.lower())
    path = Path(model).expanduser()
    if path.is_file():
        return spec_from_config(read_config(path), path.parent.name if path.name == "config.json" else path.stem)
    if path.is_dir():
        return _from_folder(path)
    if _REPO_ID.match(model) and not path.exists():
        return spec_from_config(_fetch_hf_config(model), model)
    close = difflib.get_close_matches(model.lower(), list_models(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown model {model!r}{hint} (give a catalogue name from `vramcal models`, "
        "a config.json, a checkpoint folder or a Hugging Face repo id)"
    )


def _from_folder(folder: Path) -> ModelSpec:
    from dataclasses import replace

    from estimator.families import spec_from_config
    from estimator.quant import read_safetensors_sizes

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"folder {folder} holds no config.json")
    spec = spec_from_config(read_config(config_path), folder.name)
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        spec = replace(spec, stored_bytes=read_safetensors_sizes(folder))
    return spec


def _fetch_hf_config(repo_id: str) -> dict:
    """config.json of a Hub repo, cached under ~/.cache/vramcal; offline: one clear error."""
    cached = HF_CACHE / repo_id.replace("/", "--") / "config.json"
    if cached.is_file():
        return read_config(cached)
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo_id}/resolve/main/config.json"
    request = urllib.request.Request(url, headers={"User-Agent": "vramcal"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise UserError(f"could not fetch config.json of {repo_id!r} from the Hub (HTTP {exc.code}); "
                        "check the repo id, or set HF_TOKEN for a gated repo") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"could not reach the Hugging Face Hub for {repo_id!r} ({reason}); offline? "
                        "pass a local config.json or checkpoint folder instead") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise UserError(f"the Hub returned no JSON config for {repo_id!r}") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(body)
    return data
