"""YOLO and Pascal VOC folders as COCO-format annotations, with the images left where they are.

YOLO: `images/` and `labels/` side by side (one `NAME.txt` of `class cx cy w h` lines, normalised to the image,
per image `NAME.EXT`, nested folders mirrored), the class names in `data.yaml` (`names`) or `classes.txt`; or a
`data.yaml` whose `train:`/`val:` entries name the image folders (pick one with `split`), the labels in the
`labels` folder that mirrors each `images` folder, as Ultralytics reads them.

Pascal VOC: `Annotations/*.xml` with `JPEGImages/`; the class order from `labels.txt` or `classes.txt` when
present, else alphabetical. Boxes are 1-based inclusive pixel indices (x = xmin - 1, w = xmax - xmin + 1, as
Detectron2 and hotcoco read them). `difficult` objects become `iscrowd` regions (ignored in training and
evaluation), or are kept or dropped.

Category ids are 1..K in class order, and image sizes are read from the files, in the frame the data loader
reads them in (datasets.coco: turned by the EXIF orientation when the annotation's size is the turned one).
Images without labels are kept. Malformed lines and files are Problems naming file and line; the caller
skips them or refuses the folder.

hotcoco's COCO.from_yolo / from_voc were tried first and are not used: from_yolo wants data.yaml inside the
labels folder, drops the images without labels, writes file names without their extension and stops at the
first bad line; from_voc takes sizes from <size> (0 without it) and cannot skip a bad file.
"""
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.parsers import expat

import yaml

from deta.errors import InputError
from deta.images import header, turned_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DIFFICULT = ("crowd", "keep", "drop")
YOLO_LAYOUT = ("images/ and labels/ (NAME.txt per image NAME.EXT) with data.yaml or classes.txt for the class "
               "names, or a data.yaml whose train:/val: entries name the image folders")
VOC_LAYOUT = "Annotations/*.xml and JPEGImages/"
_NORMALISED_SLACK = 1e-6  # YOLO writers round: a coordinate of 1.0000001 is on the image border


@dataclass
class Problem:
    """A malformed line or file: `path`, `line` (None: the whole file), what is wrong."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.path}{f':{self.line}' if self.line is not None else ''}: {self.message}"


@dataclass
class Conversion:
    """COCO-format annotations (`coco`), the folder its file names are relative to, and what was skipped."""

    coco: dict[str, Any]
    images_dir: Path
    problems: list[Problem] = field(default_factory=list)


class _Builder:
    """Accumulates COCO images and annotations with ids 1, 2, ..."""

    def __init__(self, names: list[str]) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]

    def add_image(self, file_name: str, width: int, height: int) -> int:
        self.images.append({"id": len(self.images) + 1, "file_name": file_name, "width": width, "height": height})
        return len(self.images)

    def add_box(self, image_id: int, category_id: int, x: float, y: float, w: float, h: float,
                iscrowd: bool = False) -> None:
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category_id,
                                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(iscrowd)})

    def coco(self, description: str) -> dict[str, Any]:
        return {"info": {"description": description}, "images": self.images, "annotations": self.annotations,
                "categories": self.categories}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_size(path: Path) -> tuple[tuple[int, int], int] | Problem:
    """((width, height) as stored, EXIF orientation), or the Problem of an unreadable file."""
    try:
        return header(path, fix="replace it or remove it")
    except InputError as err:
        return Problem(path, None, str(err).removeprefix(f"{path}: "))


# --- YOLO --------------------------------------------------------------------------------------------------

def _yolo_folders(root: Path, split: str | None) -> tuple[Path, Path, list[str], Path]:
    """(images folder, labels folder, class names, the file that named them) of a YOLO data set."""
    data_yaml, classes_txt = root / "data.yaml", root / "classes.txt"
    config: dict[str, Any] = {}
    if data_yaml.is_file():
        try:
            config = yaml.safe_load(data_yaml.read_text()) or {}
        except yaml.YAMLError as err:
            raise InputError(f"{data_yaml}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(config, dict) or "names" not in config:
            raise InputError(f"{data_yaml}: no 'names' list of the class names")
        names = config["names"]
        if isinstance(names, dict):  # Ultralytics also writes {0: name, 1: name, ...}
            if sorted(names) != list(range(len(names))):
                raise InputError(f"{data_yaml}: 'names' keys must be the class indices 0..{len(names) - 1}")
            names = [names[i] for i in range(len(names))]
        names_file = data_yaml
    elif classes_txt.is_file():
        names = [line.strip() for line in classes_txt.read_text().splitlines() if line.strip()]
        names_file = classes_txt
    else:
        raise InputError(f"{root}: not a YOLO folder: expected {YOLO_LAYOUT}")
    names = [str(name) for name in names]
    if not names:
        raise InputError(f"{names_file}: no class names")
    if split is not None:
        if split not in config or not isinstance(config[split], str):
            raise InputError(f"--split {split}: {data_yaml} has no '{split}:' entry naming an image folder")
        base = Path(config.get("path") or ".")
        images = (data_yaml.parent / base / config[split]).resolve()
    else:
        images = root / "images"
    # Ultralytics finds the labels by replacing the last 'images' folder of the path with 'labels'.
    parts = list(images.parts)
    if "images" not in parts:
        raise InputError(f"{images}: a YOLO image folder's path must contain an 'images' folder, whose "
                         "'labels' twin holds the labels")
    index = len(parts) - 1 - parts[::-1].index("images")
    labels = Path(*parts[:index], "labels", *parts[index + 1:])
    missing = next((folder for folder in (images, labels) if not folder.is_dir()), None)
    if missing is not None:
        raise InputError(f"{root}: not a YOLO folder: expected {YOLO_LAYOUT}; {missing} is missing")
    return images, labels, names, names_file


def _yolo_boxes(label: Path, num_classes: int, problems: list[Problem]) -> list[tuple[int, list[float]]]:
    """(class index, [cx, cy, w, h]) of each well-formed line; the others become Problems."""
    boxes = []
    for number, line in enumerate(label.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            problems.append(Problem(label, number, f"{len(fields)} numbers, expected 5 (class cx cy w h)"))
            continue
        try:
            cls, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            problems.append(Problem(label, number, f"'{line.strip()}' is not an integer class and 4 numbers"))
            continue
        if not 0 <= cls < num_classes:
            problems.append(Problem(label, number, f"class index {cls} out of range: {num_classes} classes "
                                                   f"(0..{num_classes - 1})"))
            continue
        cx, cy, w, h = values
        inside = all(-_NORMALISED_SLACK <= v <= 1 + _NORMALISED_SLACK
                     for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        if not (w > 0 and h > 0 and inside):
            problems.append(Problem(label, number, "the box is empty or outside the image (cx cy w h are "
                                                   "fractions of the image, 0..1)"))
            continue
        boxes.append((cls, values))
    return boxes


def yolo_to_coco(root: str | Path, split: str | None = None) -> Conversion:
    """The YOLO data set at `root` (see the module doc) as COCO annotations; file names relative to its images."""
    root = Path(root)
    images_dir, labels_dir, names, names_file = _yolo_folders(root, split)
    builder, problems = _Builder(names), []
    image_files = _image_files(images_dir)
    stems = {path.relative_to(images_dir).with_suffix("") for path in image_files}
    for label in sorted(labels_dir.rglob("*.txt")):
        if label.relative_to(labels_dir).with_suffix("") not in stems and label.name != "classes.txt":
            problems.append(Problem(label, None, f"no image of this name in {images_dir}"))
    for path in image_files:
        size = _read_size(path)
        if isinstance(size, Problem):
            problems.append(size)
            continue
        stored, orientation = size
        if orientation in (2, 3, 4):
            problems.append(Problem(path, None, f"EXIF orientation {orientation} (a flip or half turn): YOLO labels "
                                                "follow the displayed image, the data loader reads the stored one; "
                                                "save the image upright"))
            continue
        width, height = turned_size(stored, orientation)  # YOLO tools label the image as displayed
        image_id = builder.add_image(path.relative_to(images_dir).as_posix(), width, height)
        label = labels_dir / path.relative_to(images_dir).with_suffix(".txt")
        for cls, (cx, cy, w, h) in _yolo_boxes(label, len(names), problems) if label.is_file() else []:
            builder.add_box(image_id, cls + 1, (cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)
    if not builder.images:
        raise InputError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) to convert")
    return Conversion(builder.coco(f"YOLO {root}, classes from {names_file}"), images_dir, problems)


# --- Pascal VOC ----------------------------------------------------------------------------------------------

class _XmlProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _parse_xml(path: Path) -> tuple[ET.Element, dict[ET.Element, int]]:
    """The root element of an XML file and the line each element starts on (ElementTree keeps none); a bad
    file raises _XmlProblem."""
    builder, lines = ET.TreeBuilder(), {}
    parser = expat.ParserCreate()

    def start(tag: str, attrs: dict[str, str]) -> None:
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, builder.end, \
        builder.data
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as err:
        raise _XmlProblem(Problem(path, err.lineno, f"not valid XML ({expat.errors.messages[err.code]})")) from err
    return builder.close(), lines


def _voc_classes(root: Path, annotations: list[Path]) -> list[str]:
    for name in ("labels.txt", "classes.txt"):
        if (root / name).is_file():
            return [line.strip() for line in (root / name).read_text().splitlines() if line.strip()]
    found = set()
    for path in annotations:
        try:
            tree, _ = _parse_xml(path)
        except _XmlProblem:
            continue  # reported when the file is converted
        found.update((obj.findtext("name") or "").strip() for obj in tree.iter("object"))
    return sorted(found - {""})


def _voc_image(path: Path, tree: ET.Element, lines: dict[ET.Element, int], images_dir: Path,
               classes: dict[str, int], difficult: str) -> tuple[str, tuple[int, int], list[tuple]]:
    """(file name, (width, height) in the frame of the boxes, [(category id, x, y, w, h, iscrowd)])."""
    file_name = (tree.findtext("filename") or "").strip() or f"{path.stem}.jpg"
    image = images_dir / file_name
    if not image.is_file():
        raise _XmlProblem(Problem(path, lines.get(tree.find("filename")), f"its image {image} does not exist"))
    size = _read_size(image)
    if isinstance(size, Problem):
        raise _XmlProblem(size)
    stored, orientation = size
    frame = stored
    size_element = tree.find("size")
    if size_element is not None:
        try:
            annotated = (int(float(size_element.findtext("width"))), int(float(size_element.findtext("height"))))
        except (TypeError, ValueError) as err:
            raise _XmlProblem(Problem(path, lines[size_element], "<size> without numeric <width> and <height>")) \
                from err
        turned = turned_size(stored, orientation)
        if annotated not in (stored, turned):
            raise _XmlProblem(Problem(path, lines[size_element], f"<size> {annotated[0]}x{annotated[1]} is neither "
                                      f"the image's stored {stored[0]}x{stored[1]} nor its displayed "
                                      f"{turned[0]}x{turned[1]}"))
        frame = annotated  # the loader turns the image when this is its displayed size
    boxes = []
    for obj in tree.iter("object"):
        line = lines[obj]
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise _XmlProblem(Problem(path, line, f"object class '{name}' is not in the class list "
                                                  f"({', '.join(classes)})"))
        is_difficult = (obj.findtext("difficult") or "0").strip() == "1"
        if is_difficult and difficult == "drop":
            continue
        box = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as err:
            raise _XmlProblem(Problem(path, line, "object without numeric <bndbox> xmin ymin xmax ymax")) from err
        x, y, w, h = xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1
        if not (w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= frame[0] and y + h <= frame[1]):
            raise _XmlProblem(Problem(path, line, f"box {xmin:g},{ymin:g},{xmax:g},{ymax:g} is empty or outside the "
                                                  f"{frame[0]}x{frame[1]} image"))
        boxes.append((classes[name], x, y, w, h, is_difficult and difficult == "crowd"))
    return file_name, frame, boxes


def voc_to_coco(root: str | Path, difficult: str = "crowd") -> Conversion:
    """The Pascal VOC folder at `root` (see the module doc) as COCO annotations; file names relative to
    JPEGImages/. `difficult`: 'crowd' (iscrowd regions), 'keep' (ordinary boxes) or 'drop'.

    A bad XML file is one Problem, and its image is left out when skipping (its boxes cannot be trusted)."""
    root = Path(root)
    annotations_dir, images_dir = root / "Annotations", root / "JPEGImages"
    annotations = sorted(annotations_dir.glob("*.xml")) if annotations_dir.is_dir() else []
    if not annotations or not images_dir.is_dir():
        raise InputError(f"{root}: not a Pascal VOC folder: expected {VOC_LAYOUT}")
    names = _voc_classes(root, annotations)
    classes = {name: i + 1 for i, name in enumerate(names)}
    builder, problems = _Builder(names), []
    for path in annotations:
        try:
            tree, lines = _parse_xml(path)
            file_name, (width, height), boxes = _voc_image(path, tree, lines, images_dir, classes, difficult)
        except _XmlProblem as err:
            problems.append(err.problem)
            continue
        image_id = builder.add_image(file_name, width, height)
        for category_id, x, y, w, h, iscrowd in boxes:
            builder.add_box(image_id, category_id, x, y, w, h, iscrowd)
    if not builder.images:
        raise InputError(f"{root}: no convertible image: {problems[0] if problems else 'no XML files'}")
    return Conversion(builder.coco(f"Pascal VOC {root}, difficult objects: {difficult}"), images_dir, problems)
