"""Evaluation datasets: image folders and Parquet files, class names and templates."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

# torchvision's ImageFolder extensions (IMG_EXTENSIONS), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFolderSet:
    """A labelled image folder, resolved and validated (nothing decoded yet)."""

    root: Path
    folders: list[str]  # sorted class folder names: label i is folders[i]
    classnames: list[str]
    templates: list[Any]  # callables taking a class name, as open_clip accepts them
    paths: list[str]
    labels: list[int]
    groups: dict[str, list[int]] = field(default_factory=dict)  # splits.json: group -> labels


def read_text(path: Path) -> str:
    """A small text file of the dataset; one that is not UTF-8 is a ValueError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def image_source(path: str) -> Any:
    """What PIL's Image.open takes for an image path: the path, or the bytes of a URI's object."""
    import io

    return io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path


def check_images(data: ImageFolderSet) -> ImageFolderSet:
    """Open and decode every image of the folder, as training's zero-shot probe will: a file
    it could not read fails here, before Ray starts, naming it (not rank 0 mid-training).

    JPEGs decode at reduced scale (draft): corruption shows at any scale, and it stays cheap.
    """
    from PIL import Image

    bad = []
    for path in data.paths:
        try:
            with Image.open(image_source(path)) as im:
                im.draft("RGB", (64, 64))
                im.convert("RGB")  # decodes: truncated or corrupt data raises here
        except Exception as err:  # PIL raises many types on bad files: all mean unreadable
            bad.append(f"{path} ({type(err).__name__}: {err})")
    if bad:
        raise ValueError(
            f"{len(bad)} of {len(data.paths)} images in {data.root} cannot be read: "
            + "; ".join(bad[:3])
            + ("; ..." if len(bad) > 3 else "")
        )
    return data


def _fill(template: str, classname: str) -> str:
    return template.replace("{c}", classname).replace("{}", classname)


def resolve_templates(spec: str | None, root: Path | None = None) -> list[Any]:
    """'openai', 'simple', a templates file, or (None) root/templates.txt, else 'openai'."""
    if spec is None:
        has_file = root is not None and (root / "templates.txt").is_file()
        spec = str(root / "templates.txt") if has_file else "openai"
    if spec == "openai":
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"templates {spec!r}: not 'openai', 'simple' nor an existing file")
    lines = [line.strip() for line in read_text(path).splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no templates (only blank lines and # comments)")
    for line in lines:
        if "{}" not in line and "{c}" not in line:
            raise ValueError(f"{path}: template {line!r} has no {{}} or {{c}} for the class name")
    # Callables, not str.format: a template may hold other braces.
    return [functools.partial(_fill, line) for line in lines]


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """ImageNet-1k synset ids (n01440764, ...) in class-index order, which is open_clip's
    IMAGENET_CLASSNAMES order. open_clip does not ship them; timm (which open_clip requires)
    does. Empty if timm is missing: then only a full 1000-folder layout maps by position."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        return ()
    return tuple(ImageNetInfo("imagenet-1k").label_names())


def _imagenet_classnames(keys: list[str], where: Any, what: str) -> list[str]:
    names = list(open_clip.IMAGENET_CLASSNAMES)
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    # Synset-named classes map by id, so a partial copy of ImageNet (any subset) works; the
    # classifier then holds only the classes present, as for any other folder.
    if index and all(k in index for k in keys):
        return [names[index[k]] for k in keys]
    if len(keys) == len(names):  # 1000 classes named otherwise: sorted order is class order
        return names
    unknown = [k for k in keys if k not in index]
    raise ValueError(
        f"open_clip's IMAGENET_CLASSNAMES has {len(names)} class names but {where} has "
        f"{len(keys)} {what}, and {len(unknown)} of them are not ImageNet-1k synset ids "
        f"(n01440764, ...): {unknown[:5]}; name the folders by synset id, or pass a "
        "classnames file"
    )


def _read_classnames_file(path: Path) -> list[str] | dict[str, str]:
    """One name per line, or JSON: a list of names or {folder or label: name}."""
    if path.suffix.lower() != ".json":
        names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    else:
        try:
            raw = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
            return {str(k): v for k, v in raw.items()}
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise ValueError(f"{path}: expected a JSON list of names or {{folder: name}}")
        names = [v.strip() for v in raw]
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def resolve_classnames(
    spec: str | None, root: Path | None, folders: list[str], what: str = "class folders"
) -> list[str]:
    """'imagenet', a names file (.txt lines in sorted folder order, or .json list / mapping),
    or (None) root/classnames.txt or .json, else the folder names with _ as spaces.

    `folders` are the class keys in label order: folder names, or a Parquet's string labels.
    """
    where = root
    if spec is None and root is not None:
        found = [root / f for f in ("classnames.txt", "classnames.json") if (root / f).is_file()]
        spec = str(found[0]) if found else None
    if spec is None:
        return [name.replace("_", " ") for name in folders]
    if spec == "imagenet":
        return _imagenet_classnames(folders, where, what)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classnames {spec!r}: not 'imagenet' nor an existing file")
    names = _read_classnames_file(path)
    if isinstance(names, dict):
        missing = [f for f in folders if f not in names]
        if missing:
            raise ValueError(
                f"{path} names {len(folders) - len(missing)} of the {len(folders)} {what} in "
                f"{where}; missing: {missing[:5]}"
            )
        return [names[f] for f in folders]
    if len(names) != len(folders):
        raise ValueError(
            f"{spec} has {len(names)} class names but {where} has {len(folders)} {what}"
        )
    return names


def load_image_folder(
    dataset_dir: str | Path, classnames: str | None = None, templates: str | None = None
) -> ImageFolderSet:
    if storage.is_uri(dataset_dir):
        return _load_image_folder_uri(storage.normalize(dataset_dir), classnames, templates)
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"eval dataset {root} does not exist or is not a folder")
    # Hidden folders (.ipynb_checkpoints, ...) are never classes.
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class sub-folders (expected one folder per class)")
    paths, labels = [], []
    for label, name in enumerate(folders):
        files = sorted(
            str(p)
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise ValueError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += files
        labels += [label] * len(files)
    groups: dict[str, list[int]] = {}
    splits = root / "splits.json"
    if splits.is_file():
        try:
            raw = json.loads(read_text(splits))
        except json.JSONDecodeError as e:
            raise ValueError(f"{splits}: not valid JSON ({e})") from e
        if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
            raise ValueError(f"{splits}: expected {{group name: [class folder names]}}")
        for group, members in raw.items():
            unknown = sorted(set(map(str, members)) - set(folders))
            if unknown:
                raise ValueError(f"{splits}: group {group!r} names unknown folders {unknown[:5]}")
            groups[group] = sorted(folders.index(m) for m in set(members))
    return ImageFolderSet(
        root=root,
        folders=folders,
        classnames=resolve_classnames(classnames, root, folders),
        templates=resolve_templates(templates, root),
        paths=paths,
        labels=labels,
        groups=groups,
    )


def _load_image_folder_uri(
    uri: str, classnames: str | None, templates: str | None
) -> ImageFolderSet:
    """An image folder in a bucket: listed (not downloaded) into a local skeleton, its small
    text files (classnames, templates, splits) copied, images left empty; the paths returned are
    the images' URIs, read by whoever decodes them."""
    import tempfile

    files = storage.find_files(uri)
    if not files:
        raise FileNotFoundError(f"eval dataset {uri} does not exist or is empty")
    with tempfile.TemporaryDirectory(prefix="clip-dataset-") as tmp:
        for rel, _ in files:
            local = Path(tmp, *rel.split("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            if local.suffix.lower() in IMAGE_EXTENSIONS:
                local.touch()
            else:
                local.write_bytes(storage.read_bytes(storage.join(uri, rel)))
        data = load_image_folder(tmp, classnames, templates)
        root = Path(tmp).resolve()
        paths = [storage.join(uri, *Path(p).relative_to(root).parts) for p in data.paths]
    return ImageFolderSet(
        root=uri,
        folders=data.folders,
        classnames=data.classnames,
        templates=data.templates,
        paths=paths,
        labels=data.labels,
        groups=data.groups,
    )


@dataclass(frozen=True)
class ParquetSet:
    """A labelled Parquet file (image bytes + label per row), validated; images not read yet."""

    path: Path
    image_col: str
    label_col: str
    classnames: list[str]
    templates: list[Any]
    num_rows: int
    # String labels: the class keys in label order (label i is label_keys[i]). None: integer
    # labels, which index `classnames` directly.
    label_keys: list[str] | None
    groups: dict[str, list[int]] = field(default_factory=dict)

    def label_ids(self, labels: Any) -> np.ndarray:
        if self.label_keys is None:
            return np.asarray(labels, dtype=np.int64)
        index = {key: i for i, key in enumerate(self.label_keys)}
        return np.array([index[str(v)] for v in labels], dtype=np.int64)


def image_column_ok(kind: pa.DataType) -> bool:
    """Encoded bytes, or Hugging Face's image struct {bytes, path}."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def parquet_schema(path: str | Path, columns: dict[str, str]) -> pa.Schema:
    """The file's schema, after checking it exists, is Parquet and has `columns` (flag: name).

    `path` is a local path or a URI (pipeline.storage)."""
    if not storage.exists(path) or storage.isdir(path):
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        schema = storage.parquet_file(path).schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    for flag, name in columns.items():
        if name not in schema.names:
            raise ValueError(
                f"{path} has no column {name!r} ({flag}); its columns: {', '.join(schema.names)}"
            )
    return schema


def _int_label_classnames(spec: str | None, path: Path, label_col: str) -> list[str]:
    if spec == "imagenet":
        return list(open_clip.IMAGENET_CLASSNAMES)
    if spec is None:
        raise ValueError(
            f"{path}: label column {label_col!r} holds integers; pass --classnames (a file with "
            "one name per label, a JSON list or {label: name}, or 'imagenet')"
        )
    if not Path(spec).expanduser().is_file():
        raise FileNotFoundError(f"classnames {spec!r}: not 'imagenet' nor an existing file")
    names = _read_classnames_file(Path(spec).expanduser())
    if isinstance(names, dict):
        try:
            by_id = {int(k): v for k, v in names.items()}
        except ValueError:
            raise ValueError(f"{spec}: integer labels need integer keys ({{0: name}})") from None
        missing = sorted(set(range(max(by_id) + 1)) - set(by_id))
        if min(by_id) < 0 or missing:
            raise ValueError(f"{spec}: labels must be 0..{max(by_id)}, missing {missing[:5]}")
        names = [by_id[i] for i in range(len(by_id))]
    return names


def load_parquet_set(
    path: str | Path,
    classnames: str | None = None,
    templates: str | None = None,
    image_col: str = "image",
    label_col: str = "label",
) -> ParquetSet:
    """Check a labelled Parquet file and resolve its classes; reads the label column only."""
    path = Path(path).expanduser().resolve()
    if image_col == label_col:
        raise ValueError(f"--image-col and --label-col are both {image_col!r}")
    schema = parquet_schema(path, {"--image-col": image_col, "--label-col": label_col})
    if not image_column_ok(schema.field(image_col).type):
        raise ValueError(
            f"{path}: column {image_col!r} is {schema.field(image_col).type}, not encoded image "
            "bytes (binary, or a struct with a 'bytes' field)"
        )
    labels = pq.read_table(str(path), columns=[label_col]).column(label_col)
    kind = labels.type
    if len(labels) == 0:
        raise ValueError(f"{path}: no rows")
    if labels.null_count:
        raise ValueError(f"{path}: {labels.null_count} rows have no {label_col!r}")
    if pa.types.is_integer(kind):
        names = _int_label_classnames(classnames, path, label_col)
        values = labels.to_numpy()
        bad = values[(values < 0) | (values >= len(names))]
        if len(bad):
            raise ValueError(
                f"{path}: labels {sorted(set(bad.tolist()))[:5]} are outside the "
                f"{len(names)} class names (0..{len(names) - 1})"
            )
        keys = None
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        keys = sorted(set(labels.to_pylist()))
        # String labels are names already, unless --classnames renames them.
        what = f"distinct {label_col!r} values"
        names = keys if classnames is None else resolve_classnames(classnames, path, keys, what)
    else:
        raise ValueError(f"{path}: label column {label_col!r} is {kind}; expected int or string")
    return ParquetSet(
        path=path,
        image_col=image_col,
        label_col=label_col,
        classnames=names,
        templates=resolve_templates(templates, None),
        num_rows=len(labels),
        label_keys=keys,
    )


def load_dataset(
    dataset: str | Path,
    classnames: str | None = None,
    templates: str | None = None,
    image_col: str = "image",
    label_col: str = "label",
) -> ImageFolderSet | ParquetSet:
    """An image folder, or a .parquet file of image bytes and labels."""
    if str(dataset).lower().endswith(".parquet"):
        return load_parquet_set(dataset, classnames, templates, image_col, label_col)
    return load_image_folder(dataset, classnames, templates)


# -- the model -----------------------------------------------------------------------------
