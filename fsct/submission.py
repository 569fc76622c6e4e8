"""Submission files: the organisers' CSV layout written fast, read back, and checked before upload.

The layout is what `pd.DataFrame(preds.reshape(n, -1)).T.to_csv(path)` writes: a header `,0,1,...,n-1`,
then 262144 rows `pixel,label,label,...`. Slices are matched by column position, so the column order
must be the test images' numeric order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fsct.data.challenge import list_images, read_header, read_label_csv, write_labels
from fsct.errors import FsctError


def write_submission(path: Path | str, masks: np.ndarray, columns: list[str] | None = None) -> None:
    """Masks (n, 512, 512), integer labels in 0..255 -> `path`, byte-identical to the pandas call above
    (headers 0..n-1 unless `columns` is given). Written atomically."""
    n = int(np.asarray(masks).shape[0])
    names = [str(i) for i in range(n)] if columns is None else [str(c) for c in columns]
    write_labels(Path(path), masks, names, index_prefix="")


def read_submission(path: Path | str) -> tuple[list[str], np.ndarray]:
    """(column names, uint8 masks (n, 512, 512)) of a submission file, with the label file's checks."""
    columns, masks, _ = read_label_csv(Path(path), strict_index=True)
    return columns, masks


def validate_submission(path: Path | str, images_dir: Path | str) -> None:
    """Raise FsctError, naming `path` and the first problem, unless it is a well-formed submission for the
    test images in `images_dir`: index 0..262143, one column per image in numeric order (headers 0..n-1
    or the image names), integer labels in 0..255."""
    path = Path(path)
    images = list_images(Path(images_dir))
    n = len(images)
    header = read_header(path)
    first, columns = header[0], header[1:]
    positions = [str(i) for i in range(n)]
    names = [p.name for p in images]
    stems = [p.stem for p in images]
    if first != "" and first in (positions[0], names[0], stems[0]) and len(header) == n:
        raise FsctError(f"{path}: missing index column (header starts with '{first}'; expected an empty "
                        "cell, then one column per test image)")
    if len(columns) != n:
        raise FsctError(f"{path}: {len(columns)} label columns, expected {n} "
                        f"(one per test image in {images_dir})")
    if columns not in (positions, names, stems):
        k = next(i for i, c in enumerate(columns) if c not in (positions[i], names[i], stems[i]))
        raise FsctError(f"{path}: column {k + 1} is named '{columns[k]}', expected '{positions[k]}' (or "
                        f"'{names[k]}'): columns must follow the test images' numeric order")
    read_label_csv(path, strict_index=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="submission CSV (.csv or .csv.gz)")
    parser.add_argument("--images", type=Path, required=True,
                        help="the test images folder (X_test/ or X_test/images/): one column per image")


def run(args: argparse.Namespace) -> int | None:
    validate_submission(args.file, args.images)
    n = len(list_images(args.images))
    print(f"{args.file}: ok ({n} slices)")
    return 0
