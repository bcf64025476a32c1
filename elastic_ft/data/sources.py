"""Where data comes from: local files, folders and globs, `save_to_disk` folders, hub datasets.

A `data.paths` entry is a string or a mapping (`DataSource`: a hub dataset with subset, split,
revision and data files; a `save_to_disk` folder with the split to read). Each expands to one
or more source strings the pipeline carries through Ray Data and into quarantine entries:
a file path, `disk://FOLDER?split=S`, or `hf://NAME?subset=..&split=..&revision=..`.

A path that exists locally always wins. A missing one is a hub name only when it follows the
hub's own repo-id rules and does not look like a file (no data-file extension, not starting
with `.`, `/` or `~`); anything else is "not found locally and not a valid hub dataset name".
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
              ".arrow": "arrow", ".feather": "arrow"}
DATASET_DICT_FILE = "dataset_dict.json"
DATASET_FILES = ("dataset_info.json", "state.json")


class SourceError(ValueError):
    """A data path that cannot be read at all."""


def is_hub_name(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or Path(name).suffix in EXTENSIONS:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def encode(scheme: str, where: str, **params: Any) -> str:
    query = urlencode({k: (",".join(v) if isinstance(v, list) else v)
                       for k, v in params.items() if v is not None})
    return f"{scheme}://{where}" + (f"?{query}" if query else "")


def decode(source: str) -> tuple[str, str, dict[str, Any]]:
    """`hf://name?split=test` -> ("hf", "name", {"split": "test"})."""
    scheme, rest = source.split("://", 1)
    where, _, query = rest.partition("?")
    params: dict[str, Any] = dict(parse_qsl(query))
    if "data_files" in params:
        params["data_files"] = params["data_files"].split(",")
    return scheme, where, params


def _saved_folder(path: Path, split: str | None, explicit: bool) -> str:
    """A `save_to_disk` folder: a Dataset, or a DatasetDict read at one split."""
    if (path / DATASET_DICT_FILE).exists():
        import json

        splits = json.loads((path / DATASET_DICT_FILE).read_text()).get("splits", [])
        chosen = split or "train"
        if chosen not in splits:
            hint = "set split" if not explicit else "pick one of them"
            raise SourceError(f"{path}: a saved DatasetDict without split {chosen!r} "
                              f"(splits: {', '.join(splits)}); {hint}")
        return encode("disk", str(path.resolve()), split=chosen)
    return encode("disk", str(path.resolve()))


def _local(path: Path) -> list[str]:
    if path.is_dir() and ((path / DATASET_DICT_FILE).exists()
                          or any((path / f).exists() for f in DATASET_FILES)):
        return [_saved_folder(path, None, explicit=False)]
    if path.is_dir():
        found = sorted(str(f) for f in path.rglob("*") if f.suffix in EXTENSIONS)
        if not found:
            raise SourceError(f"{path}: directory holds no {'/'.join(EXTENSIONS)} files")
        return found
    if path.suffix not in EXTENSIONS:
        raise SourceError(f"{path}: unsupported extension; allowed: {', '.join(EXTENSIONS)}")
    return [str(path)]


def expand_entry(entry: Any) -> list[str]:
    if not isinstance(entry, str):  # a DataSource
        path = Path(entry.path)
        if path.is_dir() and ((path / DATASET_DICT_FILE).exists()
                              or any((path / f).exists() for f in DATASET_FILES)):
            return [_saved_folder(path, entry.split, explicit=True)]
        if not path.exists() and not is_hub_name(entry.path):
            raise SourceError(f"{entry.path}: not found locally and not a valid hub dataset "
                              "name (namespace/name)")
        where = str(path.resolve()) if path.exists() else entry.path
        return [encode("hf", where, subset=entry.subset, split=entry.split or "train",
                       revision=entry.revision, data_files=entry.data_files)]
    path = Path(entry)
    if path.exists():
        return _local(path)
    if any(ch in entry for ch in "*?["):
        found = sorted(f for f in glob.glob(entry, recursive=True) if Path(f).suffix in EXTENSIONS)
        if not found:
            raise SourceError(f"{entry}: glob matches no data files")
        return found
    if is_hub_name(entry):
        return [encode("hf", entry, split="train")]
    raise SourceError(f"{entry}: not found locally and not a valid hub dataset name "
                      "(namespace/name); check the path")


def expand_sources(paths: list[Any]) -> list[str]:
    """Files, saved folders and hub datasets, in a stable order."""
    return [source for entry in paths for source in expand_entry(entry)]


def load_remote(source: str) -> Any:
    """A `disk://` or `hf://` source as a `datasets.Dataset` (the library's own loaders)."""
    import datasets

    scheme, where, params = decode(source)
    if scheme == "disk":
        ds = datasets.load_from_disk(where)
        return ds[params["split"]] if isinstance(ds, datasets.DatasetDict) else ds
    try:
        return datasets.load_dataset(where, params.get("subset"), split=params.get("split"),
                                     revision=params.get("revision"),
                                     data_files=params.get("data_files"))
    except Exception as error:  # offline, unknown name, or a bad split
        raise SourceError(f"{where}: cannot load dataset ({str(error).splitlines()[0]})") from None
