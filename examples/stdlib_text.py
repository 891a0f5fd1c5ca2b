"""Real text with no download: the Python standard library's own source files.

Every machine that runs these examples has a Python installation, and its standard library is a
few tens of MB of real, varied text (code, docstrings, comments). This module turns it into a
small language-modelling corpus:

* the ``.py`` files under ``sysconfig.get_paths()['stdlib']`` (``site-packages`` and
  ``dist-packages`` skipped, test directories skipped unless asked for), sorted by path;
* a deterministic split by file: every ``heldout_every``-th file of the sorted list is held out;
* an optional byte budget per split, filled in a fixed pseudo-random file order (a hash of the
  path), so a small budget still samples the whole library and a larger budget is a superset;
* a byte-level BPE tokenizer (``tokenizers``) trained on the training split only, on the spot,
  and cached with the encoded token streams under ``$CGGR_HOOK_CACHE`` (default
  ``$XDG_CACHE_HOME/cggr_hook``, else ``~/.cache/cggr_hook``; ``--cache-dir`` overrides), keyed
  by the vocabulary size and a hash of the file list.

>>> corpus = load_corpus(vocab_size=4096, max_bytes=3_000_000)
>>> x = next(corpus.batches(batch_size=16, seq_len=128, seed=0))   # (16, 128) int64
>>> val = corpus.heldout_sequences(seq_len=128)                    # (n, 128) int64

Run ``python examples/stdlib_text.py --vocab-size 4096 --max-bytes 3000000`` to build (or
check) the cache and print the corpus' figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

EOS = "<|endoftext|>"
TEST_DIR_NAMES = {"test", "tests", "idle_test"}
SKIP_DIR_NAMES = {"site-packages", "dist-packages", "__pycache__"}
FORMAT_VERSION = 1  # bump when the cached files change meaning


def default_cache_dir() -> Path:
    """``$CGGR_HOOK_CACHE``, else ``$XDG_CACHE_HOME/cggr_hook``, else ``~/.cache/cggr_hook`` (the
    XDG base-directory rule: a relative ``XDG_CACHE_HOME`` is ignored)."""
    env = os.environ.get("CGGR_HOOK_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "cggr_hook"
    return Path.home() / ".cache" / "cggr_hook"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(root: Path | None = None, include_tests: bool = False) -> list[tuple[str, int]]:
    """``(relative path, size in bytes)`` of every standard-library ``.py`` file, sorted by path."""
    root = Path(root) if root is not None else stdlib_root()
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = SKIP_DIR_NAMES | (set() if include_tests else TEST_DIR_NAMES)
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            if not include_tests and name.startswith("test_") and path.parent != root:
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            found.append((path.relative_to(root).as_posix(), size))
    found.sort()
    return found


def _order_key(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


def _budget(files: list[tuple[str, int]], max_bytes: int | None) -> list[tuple[str, int]]:
    """Files in a fixed pseudo-random order until ``max_bytes`` is reached (all when None)."""
    ordered = sorted(files, key=lambda f: _order_key(f[0]))
    if max_bytes is None:
        return ordered
    out, total = [], 0
    for rel, size in ordered:
        if total >= max_bytes:
            break
        out.append((rel, size))
        total += size
    return out


def split_files(
    files: list[tuple[str, int]],
    heldout_every: int = 10,
    max_bytes: int | None = None,
    max_heldout_bytes: int | None = None,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out): every ``heldout_every``-th file of the sorted list is held out, then each
    split is cut to its byte budget (``max_heldout_bytes`` defaults to ``max_bytes / (every - 1)``,
    the split's natural proportion)."""
    if heldout_every < 2:
        raise ValueError("heldout_every must be >= 2")
    files = sorted(files)
    train = [f for i, f in enumerate(files) if i % heldout_every != heldout_every - 1]
    held = [f for i, f in enumerate(files) if i % heldout_every == heldout_every - 1]
    if max_heldout_bytes is None and max_bytes is not None:
        max_heldout_bytes = max(1, max_bytes // (heldout_every - 1))
    return _budget(train, max_bytes), _budget(held, max_heldout_bytes)


def _read(root: Path, rel: str) -> str:
    return (root / rel).read_bytes().decode("utf-8", errors="replace")


def _files_hash(root: Path, train: list, held: list) -> str:
    h = hashlib.sha1()
    h.update(f"v{FORMAT_VERSION}\n".encode())
    for tag, files in (("train", train), ("held", held)):
        for rel, size in files:
            h.update(f"{tag}\t{rel}\t{size}\n".encode())
    return h.hexdigest()[:16]


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer with one special token, ``<|endoftext|>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _encode(tok, texts: list[str], eos_id: int) -> torch.Tensor:
    """One stream: each file's tokens followed by ``<|endoftext|>``."""
    ids: list[int] = []
    for start in range(0, len(texts), 64):
        for enc in tok.encode_batch(texts[start : start + 64]):
            ids.extend(enc.ids)
            ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class Corpus:
    """Token streams of the two splits, and the tokenizer that made them."""

    train_tokens: torch.Tensor  # (N,) int32
    heldout_tokens: torch.Tensor  # (M,) int32
    vocab_size: int
    tokenizer_path: Path
    info: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))

    def train_sequences(self, seq_len: int) -> torch.Tensor:
        """The training stream cut into non-overlapping ``(n, seq_len)`` int64 rows."""
        n = self.train_tokens.numel() // seq_len
        if n == 0:
            raise ValueError(f"the training stream ({self.train_tokens.numel()} tokens) is shorter than seq_len={seq_len}")
        return self.train_tokens[: n * seq_len].view(n, seq_len).long()

    def heldout_sequences(self, seq_len: int) -> torch.Tensor:
        """The whole held-out stream as ``(n, seq_len)`` int64 rows (the last, partial row dropped:
        fewer than ``seq_len`` tokens)."""
        n = self.heldout_tokens.numel() // seq_len
        if n == 0:
            raise ValueError(f"the held-out stream ({self.heldout_tokens.numel()} tokens) is shorter than seq_len={seq_len}")
        return self.heldout_tokens[: n * seq_len].view(n, seq_len).long()

    def batches(
        self, batch_size: int, seq_len: int, seed: int = 0, steps: int | None = None
    ) -> Iterator[torch.Tensor]:
        """``(batch_size, seq_len)`` int64 training batches in a seeded, deterministic order.

        Epochs of a seeded permutation of the non-overlapping rows; the same (seed, sizes) give the
        same batches on every machine and every call. Endless unless ``steps`` is given.
        """
        rows = self.train_sequences(seq_len)
        if rows.shape[0] < batch_size:
            raise ValueError(f"only {rows.shape[0]} training rows of {seq_len} tokens for batch_size={batch_size}")
        gen = torch.Generator().manual_seed(int(seed))
        done = 0
        while steps is None or done < steps:
            perm = torch.randperm(rows.shape[0], generator=gen)
            for start in range(0, rows.shape[0] - batch_size + 1, batch_size):
                if steps is not None and done >= steps:
                    return
                yield rows[perm[start : start + batch_size]]
                done += 1


def load_corpus(
    vocab_size: int = 16384,
    max_bytes: int | None = None,
    max_heldout_bytes: int | None = None,
    heldout_every: int = 10,
    include_tests: bool = False,
    cache_dir: str | Path | None = None,
    verbose: bool = False,
) -> Corpus:
    """Build (or read from the cache) the tokenizer and both token streams.

    ``max_bytes`` caps the training split's bytes (all files when None) and so the tokenizer's
    training time; ``max_heldout_bytes`` caps the held-out split (default: the same proportion).
    """
    root = stdlib_root()
    files = list_stdlib_files(root, include_tests=include_tests)
    if not files:
        raise RuntimeError(f"no .py files found under {root}")
    train, held = split_files(files, heldout_every, max_bytes, max_heldout_bytes)
    if not train or not held:
        raise RuntimeError("the byte budget left a split empty: raise max_bytes")
    key = f"stdlib-v{vocab_size}-{_files_hash(root, train, held)}"
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tok_path = cache / f"{key}.tokenizer.json"
    data_path = cache / f"{key}.tokens.pt"
    info = {
        "stdlib": str(root),
        "key": key,
        "vocab_size": vocab_size,
        "train_files": len(train),
        "heldout_files": len(held),
        "train_bytes": sum(s for _, s in train),
        "heldout_bytes": sum(s for _, s in held),
    }
    if tok_path.exists() and data_path.exists():
        data = torch.load(data_path)
        info.update(data["info"], cached=True)
        return Corpus(data["train"], data["heldout"], vocab_size, tok_path, info)

    t0 = time.perf_counter()
    train_texts = [_read(root, rel) for rel, _ in train]
    held_texts = [_read(root, rel) for rel, _ in held]
    if tok_path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer(train_texts, vocab_size)
        tmp = tok_path.with_name(f"{tok_path.name}.{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, tok_path)
    t1 = time.perf_counter()
    eos_id = tok.token_to_id(EOS)
    train_ids = _encode(tok, train_texts, eos_id)
    held_ids = _encode(tok, held_texts, eos_id)
    t2 = time.perf_counter()
    info.update(
        train_tokens=int(train_ids.numel()),
        heldout_tokens=int(held_ids.numel()),
        tokenizer_seconds=round(t1 - t0, 2),
        encode_seconds=round(t2 - t1, 2),
        actual_vocab_size=tok.get_vocab_size(),
    )
    _atomic_save({"train": train_ids, "heldout": held_ids, "info": dict(info)}, data_path)
    if verbose:
        print(f"stdlib_text: tokenizer {t1 - t0:.1f}s, encoding {t2 - t1:.1f}s -> {data_path}")
    info["cached"] = False
    return Corpus(train_ids, held_ids, vocab_size, tok_path, info)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--max-bytes", type=int, default=None, help="training-split byte budget (default: all)")
    p.add_argument("--max-heldout-bytes", type=int, default=None)
    p.add_argument("--include-tests", action="store_true")
    p.add_argument("--cache-dir", default=None,
                   help="default: $CGGR_HOOK_CACHE, else $XDG_CACHE_HOME/cggr_hook, else ~/.cache/cggr_hook")
    args = p.parse_args()
    t0 = time.perf_counter()
    corpus = load_corpus(
        args.vocab_size, args.max_bytes, args.max_heldout_bytes,
        include_tests=args.include_tests, cache_dir=args.cache_dir, verbose=True,
    )
    info = dict(corpus.info, seconds=round(time.perf_counter() - t0, 2))
    print(json.dumps(info, indent=2))
    sample = corpus.tokenizer.decode(corpus.heldout_tokens[:48].tolist())
    print("held-out sample:", repr(sample))


if __name__ == "__main__":
    main()
