"""The challenge's own files: slice PNGs and the transposed label CSV (`Y_train.csv`, submissions).

The label CSV is 262144 rows (pixels) by one column per slice, about 1.1 GB of text for the 2000 train
slices. It is parsed in row blocks by pyarrow's streaming reader straight into one preallocated uint8
array, so the peak memory is the masks themselves plus one block, never a DataFrame of the file.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from PIL import Image, UnidentifiedImageError

from fsct.atomic import atomic_file
from fsct.errors import FsctError

SIZE = 512
N_PIXELS = SIZE * SIZE
# Blocks of about a thousand rows (1-8 MB of text): big enough that the per-block cost is small next to the
# parsing, small enough that pyarrow's buffers stay a few hundred MB even for 2000 columns (16 MB blocks
# cost ~800 MB of RSS on top of the masks, 4 MB blocks ~200 MB).
_BLOCK_ROWS = 1024
_INT_STEM = re.compile(r"^[0-9]+$")
_MIN_RANGE_BYTES = 32 << 20  # a file is parsed on several threads only in ranges at least this large


def list_images(folder: Path) -> list[Path]:
    """The slice PNGs of `X_train/` (or `X_train/images/`), in numeric order of their integer names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FsctError(f"{folder}: image folder not found")
    pngs = sorted(folder.glob("*.png"))
    if not pngs and (folder / "images").is_dir():
        folder = folder / "images"
        pngs = sorted(folder.glob("*.png"))
    if not pngs:
        raise FsctError(f"{folder}: no .png images in this folder (or in its images/ subfolder)")
    by_number: dict[int, Path] = {}
    for p in pngs:
        if not _INT_STEM.match(p.stem):
            raise FsctError(f"{p}: image name is not an integer (expected e.g. 17.png)")
        n = int(p.stem)
        if n in by_number:
            raise FsctError(f"{p}: same slice number as {by_number[n].name}")
        by_number[n] = p
    return [by_number[n] for n in sorted(by_number)]


def read_image(path: Path) -> np.ndarray:
    """One slice as a (512, 512) uint8 array; colour is made grey, 16-bit is scaled to 8-bit."""
    path = Path(path)
    if not path.is_file():
        raise FsctError(f"{path}: image not found")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a worker
            arr = _to_gray_u8(img)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise FsctError(f"{path}: not a readable PNG image ({_one_line(e)})") from e
    if arr.shape != (SIZE, SIZE):
        raise FsctError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, expected {SIZE}x{SIZE}")
    return arr


def _to_gray_u8(img: Image.Image) -> np.ndarray:
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit data: full range 0..65535 -> 0..255 (PIL's own "L" conversion would clip instead).
        wide = np.asarray(img).astype(np.int64)
        return ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
    if img.mode == "F":
        return np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
    return np.asarray(img.convert("L"), dtype=np.uint8).copy()


def read_labels(path: Path, image_names: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """The label CSV -> (column names as in its header, uint8 masks (n_columns, 512, 512)).

    Checks while reading: 262144 rows, a pixel index first column (`i` or `Pixel i`), integer labels in
    0..255, unique column names, and (with `image_names`) that every column has its image.
    """
    columns, masks, _ = read_label_csv(path, image_names)
    return columns, masks


def read_label_csv(path: Path, image_names: list[str] | None = None,
                   strict_index: bool = False) -> tuple[list[str], np.ndarray, str]:
    """`read_labels` plus the header's first cell. `strict_index`: the index must be plain 0..262143
    (the submission format), not `Pixel i`."""
    path = Path(path)
    if not path.is_file():
        raise FsctError(f"{path}: label file not found")
    header = read_header(path)
    if len(header) < 2:
        raise FsctError(f"{path}: header has no label columns (expected ',0.png,1.png,...')")
    index_name, columns = header[0], header[1:]
    seen: dict[str, int] = {}
    for i, c in enumerate(columns):
        if c in seen:
            raise FsctError(f"{path}: duplicate column name '{c}' (columns {seen[c] + 1} and {i + 1})")
        seen[c] = i
    if image_names is not None:
        _check_columns_have_images(path, columns, image_names)

    n = len(columns)
    flat = np.empty((n, N_PIXELS), dtype=np.uint8)
    _read_rows(path, columns, flat, strict_index)
    return columns, flat.reshape(n, SIZE, SIZE), index_name


def _csv_options(n: int, skip_header: bool = True) -> tuple[pacsv.ReadOptions, pacsv.ConvertOptions]:
    names = ["index"] + [f"c{i}" for i in range(n)]
    types = {name: pa.uint8() for name in names[1:]}  # anything but an integer in 0..255 fails to parse
    types["index"] = pa.string()
    read = pacsv.ReadOptions(skip_rows=int(skip_header), column_names=names, block_size=_block_bytes(n),
                             use_threads=True)
    convert = pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                   quoted_strings_can_be_null=False)
    return read, convert


def _store(batch: pa.RecordBatch, flat: np.ndarray, row: int) -> None:
    # One column-major copy per block: a per-column loop costs more than the parsing itself.
    block = batch.drop_columns(["index"]).to_tensor(row_major=False)
    flat[:, row:row + batch.num_rows] = np.asarray(block).T


def _read_rows(path: Path, columns: list[str], flat: np.ndarray, strict_index: bool) -> None:
    """Every pixel row into `flat`. A plain .csv of some size is cut at line ends into one byte range per
    core, parsed on threads (pyarrow releases the GIL: 2 cores read the 1.1 GB file in half the time);
    a .gz file is one stream."""
    ranges = _line_ranges(path)
    if len(ranges) == 1:
        rows = _read_stream(path, path, columns, flat, strict_index, start_row=0)
    else:
        with ThreadPoolExecutor(len(ranges)) as pool:
            counts = list(pool.map(lambda r: _count_lines(path, *r), ranges))
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
            if sum(counts) > N_PIXELS:
                raise FsctError(f"{path}: more than {N_PIXELS} rows (one per pixel of a 512x512 slice)")
            jobs = [pool.submit(_read_stream, path, _ByteRange(path, a, b), columns, flat, strict_index, start)
                    for (a, b), start in zip(ranges, starts, strict=True)]
            rows = sum(j.result() for j in jobs)
    if rows != N_PIXELS:
        raise FsctError(f"{path}: {rows} rows, expected {N_PIXELS} (one per pixel; truncated file?)")


def _read_stream(path: Path, source: Path | io.RawIOBase, columns: list[str], flat: np.ndarray,
                 strict_index: bool, start_row: int) -> int:
    """One pyarrow stream (the whole file, header skipped, or a byte range of rows), block after block
    into `flat` from `start_row`; its errors name the file's line."""
    read, convert = _csv_options(len(columns), skip_header=isinstance(source, Path))
    row = start_row
    stream = source if isinstance(source, Path) else pa.PythonFile(source, mode="r")
    try:
        for batch in pacsv.open_csv(stream, read_options=read, convert_options=convert):
            m = batch.num_rows
            if m == 0:
                continue
            if row + m > N_PIXELS:
                raise FsctError(f"{path}: more than {N_PIXELS} rows (one per pixel of a 512x512 slice)")
            _check_index(path, batch.column(0), row, strict_index)
            _store(batch, flat, row)
            row += m
    except pa.ArrowInvalid as e:
        # pyarrow numbers rows from 1 in its own stream: the file's line in the whole stream (header
        # included), the range's row otherwise
        offset = 0 if isinstance(source, Path) else start_row + 1
        raise FsctError(f"{path}: {_explain_arrow(str(e), columns, line_offset=offset)}") from e
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise FsctError(f"{path}: cannot read ({_one_line(e)})") from e
    return row - start_row


def _line_ranges(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the rows after the header, cut at line ends: one per core, at least 32 MB each."""
    size = path.stat().st_size
    parts = min(os.cpu_count() or 1, size // _MIN_RANGE_BYTES)
    if path.name.endswith(".gz") or parts < 2:
        return [(0, size)]
    with open(path, "rb") as f:
        f.readline()
        cuts = [f.tell()]
        for i in range(1, parts):
            f.seek(cuts[0] + (size - cuts[0]) * i // parts)
            f.readline()
            cuts.append(max(f.tell(), cuts[-1]))
    cuts.append(size)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def _count_lines(path: Path, start: int, end: int) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(left, 16 << 20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
            last = chunk[-1:]
    return n + (last != b"\n")  # a last line without its newline still counts


class _ByteRange(io.RawIOBase):
    """[start, end) of a file as a stream, for one parsing thread."""

    def __init__(self, path: Path, start: int, end: int):
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed with the stream)
        self._f.seek(start)
        self._left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._left)
        if n <= 0:
            return 0
        got = self._f.readinto(memoryview(b)[:n]) or 0
        self._left -= got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _block_bytes(n_columns: int) -> int:
    row_bytes = 2 * n_columns + 16  # "0," per label, mostly, plus the index
    return int(np.clip(row_bytes * _BLOCK_ROWS, 1 << 20, 8 << 20))


def column_to_image(columns: list[str], image_names: list[str]) -> list[int]:
    """For each label column, the index of its image in `image_names` (file names such as "17.png").

    By name ("17.png" or "17"); when the headers are the plain positions 0..n-1 of n images instead,
    by position. Raises FsctError (without a file name: the caller adds it) for a column with no image.
    """
    lookup: dict[str, int] = {}
    for i, name in enumerate(image_names):
        lookup[name] = i
        lookup.setdefault(Path(name).stem, i)
    found = [lookup.get(c) for c in columns]
    if all(f is not None for f in found):
        return [int(f) for f in found]  # type: ignore[arg-type]
    if len(columns) == len(image_names) and columns == [str(i) for i in range(len(columns))]:
        return list(range(len(columns)))
    missing = next(c for c, f in zip(columns, found, strict=True) if f is None)
    span = f"{image_names[0]}..{image_names[-1]}" if image_names else "none"
    raise FsctError(f"column '{missing}' has no matching image ({len(image_names)} images: {span})")


def _check_columns_have_images(path: Path, columns: list[str], image_names: list[str]) -> None:
    try:
        column_to_image(columns, image_names)
    except FsctError as e:
        raise FsctError(f"{path}: {e}") from e


def read_header(path: Path) -> list[str]:
    """The label CSV's header cells (the first is the index name, usually empty)."""
    path = Path(path)
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            line = f.readline()
    except (OSError, EOFError) as e:
        raise FsctError(f"{path}: cannot read ({_one_line(e)})") from e
    if not line.strip():
        raise FsctError(f"{path}: empty file (expected a header row ',0.png,1.png,...')")
    text = line.decode("utf-8-sig", errors="replace")
    return next(csv.reader(io.StringIO(text)))


def _check_index(path: Path, index: pa.Array, start: int, strict: bool) -> None:
    """The first column must count pixels from 0: `i` (pandas' default index) or `Pixel i` (Y_train)."""
    text = index if strict else pc.replace_substring_regex(index, pattern="^Pixel ", replacement="")
    expected = np.arange(start, start + len(index))
    try:
        numbers = pc.cast(text, pa.int64()).to_numpy()
        if np.array_equal(numbers, expected):
            return
        bad = int(np.argmax(numbers != expected))
    except pa.ArrowInvalid:
        bad = next(i for i, v in enumerate(text.to_pylist()) if not _INT_STEM.match(v))
    want = f"{start + bad}" if strict else f"{start + bad} or 'Pixel {start + bad}'"
    got = index[bad].as_py()[:40]
    raise FsctError(f"{path}: line {start + bad + 2}: first column is '{got}', expected pixel index {want} "
                    "(missing index column?)")


def _explain_arrow(msg: str, columns: list[str], line_offset: int = 0) -> str:
    """Arrow's parse errors, reworded to name the column and the problem on one line."""
    conv = re.search(r"CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to \w+: invalid value '(.*)'",
                     msg, re.S)
    if conv:
        col = int(conv.group(1))
        value = conv.group(3)[:40]
        where = f"column '{columns[col - 1]}'" if 1 <= col <= len(columns) else "index column"
        if conv.group(2):
            where = f"line {int(conv.group(2)) + line_offset}, {where}"
        if re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):
            return f"{where}: label {value.strip()} is outside 0..255"
        if value == "":
            return f"{where}: empty label (every pixel needs an integer label; truncated file?)"
        return f"{where}: label '{value}' is not an integer"
    fields = re.search(r"Expected (\d+) columns, got (\d+)", msg)
    if fields:
        return (f"a row has {fields.group(2)} fields, expected {fields.group(1)} "
                "(truncated or malformed file?)")
    return _one_line(msg)


def _one_line(e: object) -> str:
    text = " ".join(str(e).split())
    return text[:200]


def write_labels(path: Path, masks: np.ndarray, columns: list[str], index_prefix: str = "Pixel ") -> None:
    """Masks (n, 512, 512) in 0..255 -> the label CSV layout, written atomically (`.gz`: compressed).

    The text is exactly what pandas writes for `DataFrame(masks.reshape(n, -1)).T` with these column
    names and an index `index_prefix + i`, built with numpy: each label becomes a pre-encoded 4-byte word
    ("17," padded with NULs), each row the index word(s) then the labels, and the NULs are squeezed out.
    """
    path = Path(path)
    flat = _as_label_rows(masks)
    n = flat.shape[0]
    if len(columns) != n:
        raise ValueError(f"{len(columns)} column names for {n} masks")
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow([""] + [str(c) for c in columns])
    lut = np.zeros((2, 256, 4), dtype=np.uint8)
    for v in range(256):
        for k, end in enumerate((",", "\n")):
            b = f"{v}{end}".encode()
            lut[k, v, :len(b)] = np.frombuffer(b, dtype=np.uint8)
    words = lut.view("<u4").reshape(2, 256)
    idx_words = -(-(len(index_prefix) + len(str(N_PIXELS)) + 1) // 4)
    with atomic_file(path) as tmp:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(tmp, "wb") as f:
            f.write(header.getvalue().encode())
            # Rows per block: about 1 MB of words, so the transpose below stays in cache.
            step = max(64, (1 << 20) // (4 * (idx_words + n)))
            for r0 in range(0, N_PIXELS, step):
                r1 = min(r0 + step, N_PIXELS)
                block = np.empty((r1 - r0, idx_words + n), dtype="<u4")
                index = np.array([f"{index_prefix}{i}," for i in range(r0, r1)], dtype=f"S{4 * idx_words}")
                block[:, :idx_words] = index.view("<u4").reshape(r1 - r0, idx_words)
                # Look the words up in (column, row) order, where the masks are contiguous, then transpose
                # the 4-byte words: much faster than transposing bytes first.
                block[:, idx_words:-1] = np.take(words[0], flat[:-1, r0:r1]).T
                block[:, -1] = np.take(words[1], flat[-1, r0:r1])
                text = block.view(np.uint8).reshape(-1)
                f.write(text[text != 0])


def _as_label_rows(masks: np.ndarray) -> np.ndarray:
    """(n, 512, 512) or (n, 262144) integer labels -> uint8 (n, 262144); anything else is refused."""
    masks = np.asarray(masks)
    if masks.ndim == 3:
        masks = masks.reshape(masks.shape[0], -1)
    if masks.ndim != 2 or masks.shape[1] != N_PIXELS or masks.shape[0] == 0:
        raise ValueError(f"masks must be (n, {SIZE}, {SIZE}) with n >= 1, got {masks.shape}")
    if masks.dtype == np.uint8:
        return masks
    if not np.issubdtype(masks.dtype, np.integer) and masks.dtype != np.bool_:
        raise ValueError(f"masks must hold integer labels, got {masks.dtype}")
    lo, hi = int(masks.min()), int(masks.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"labels must be in 0..255, got {lo}..{hi}")
    return masks.astype(np.uint8)
