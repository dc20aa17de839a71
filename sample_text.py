"""Real English text with no network: Python's own documentation, written as a FineWeb-style parquet file.

The tests, the benchmarks and anyone without the Hub need real prose in FineWeb's schema. Python ships
plenty: pydoc's help topics, every docstring of the standard library (read with `ast`, never imported)
and the comment blocks beside its code, one document each, in a fixed order (about 3.7 MB, ~1M tokens).

    python sample_text.py datasets/sample.parquet [--max-chars N]
    python prepare_datasets.py --input datasets/sample.parquet --output datasets/sample \
        --train-tokens 300000 --val-tokens 30000 --val-fraction 0.1
"""

import argparse
import ast
import os
import sys
import sysconfig
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

import cli

OUTPUT = "datasets/sample.parquet"
MIN_DOCSTRING_CHARS = 40  # shorter ones are mostly "Return self." boilerplate
MIN_COMMENT_CHARS = 120   # a comment block this long is usually a sentence or two of explanation
ROW_GROUP_SIZE = 1000     # documents per parquet row group; FineWeb's files have many row groups too

# FineWeb's columns, in its order (see the dataset card); only `text` matters to prepare_datasets.py.
SCHEMA = pa.schema([
    ("text", pa.string()), ("id", pa.string()), ("dump", pa.string()), ("url", pa.string()),
    ("date", pa.string()), ("file_path", pa.string()), ("language", pa.string()),
    ("language_score", pa.float64()), ("token_count", pa.int64()),
])
SKIP_DIRS = {"site-packages", "__pycache__"}  # third-party code is not "text that ships with Python"


def docstrings(source):
    """(line, docstring) for the module, each class and each function, in ast.walk's breadth-first order.
    The walk descends only through statements (and the except and case clauses holding them): a def or
    class cannot sit inside an expression, and skipping expressions makes this twice as fast as ast.walk."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # the stdlib's tests include deliberately broken files
        return
    level = [tree]
    while level:
        for node in level:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= MIN_DOCSTRING_CHARS:
                    yield getattr(node, "lineno", 1), text
        level = [child for node in level for child in ast.iter_child_nodes(node)
                 if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case))]


def comment_blocks(source):
    """(line, text) for each run of consecutive whole-line comments, joined into one paragraph."""
    block, first = [], 0
    for number, line in enumerate(source.splitlines() + [""], start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            if not block:
                first = number
            block.append(stripped.lstrip("#").strip())
            continue
        text = " ".join(part for part in block if part)
        if len(text) >= MIN_COMMENT_CHARS and not text.startswith("!"):
            yield first, text
        block = []


def iter_texts():
    """(where, text) of every document: pydoc's help topics (the language reference), then the stdlib's files."""
    from pydoc_data.topics import topics  # a module holding one dict of strings; importing it runs nothing else
    for name in sorted(topics):
        yield f"pydoc_data/topics.py#{name}", topics[name].strip()
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(n for n in filenames if n.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    source = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            where = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            for line, text in docstrings(source):
                yield f"{where}#L{line}-docstring", text
            for line, text in comment_blocks(source):
                yield f"{where}#L{line}-comment", text


def iter_documents(max_documents=None, max_chars=None):
    """FineWeb-schema rows, deduplicated by text, in a fixed order (token_count: write_sample_parquet's)."""
    version = f"python-{sys.version_info.major}.{sys.version_info.minor}"
    seen, count, chars = set(), 0, 0
    for where, text in iter_texts():
        if text in seen:
            continue
        if (max_documents is not None and count >= max_documents) or (max_chars is not None and chars >= max_chars):
            return
        seen.add(text)
        count, chars = count + 1, chars + len(text)
        url = f"python-stdlib://{version}/{where}"
        yield {"text": text, "id": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{count}:{url}')}>", "dump": f"{version}-stdlib",
               "url": url, "date": None, "file_path": where.split("#")[0], "language": "en",
               "language_score": 1.0, "token_count": None}


def write_sample_parquet(path, max_chars=None):
    """Write the documents to a FineWeb-schema parquet file; returns the number of documents."""
    from gpt import get_tokenizer  # imported here so `import sample_text` stays light
    rows = list(iter_documents(max_chars=max_chars))
    # FineWeb's token_count column is the GPT-2 token count, so ours is too.
    for row, tokens in zip(rows, get_tokenizer().encode_ordinary_batch([r["text"] for r in rows])):
        row["token_count"] = len(tokens)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=ROW_GROUP_SIZE)
    return len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", default=OUTPUT, help=f"parquet file to write (default {OUTPUT})")
    parser.add_argument("--max-chars", type=cli.positive_int, help="stop once this many characters are written")
    args = parser.parse_args(argv)
    if os.path.isdir(args.output):
        parser.error(f"{args.output} is a folder; give a file name such as {OUTPUT}")
    n = write_sample_parquet(args.output, args.max_chars)
    print(f"wrote {n:,} documents to {args.output} ({os.path.getsize(args.output) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
