"""Real text with no download: the Python sources already on this machine.

Every machine that runs these examples has a Python installation, and its standard library is a
few tens of MB of real, varied text (code, docstrings, comments); with the installed packages
(``site-packages``) it is a few hundred MB. This module turns either into a language-modelling
corpus:

* ``sources='stdlib'`` (the default): the ``.py`` files under ``sysconfig.get_paths()['stdlib']``
  (``site-packages`` and ``dist-packages`` skipped, test directories skipped unless asked for),
  sorted by path; ``sources='python'``: those plus every ``.py`` file of the installed packages
  (``purelib`` / ``platlib``; files over ``MAX_FILE_BYTES`` skipped as generated), with files of
  identical content kept once, so no copy can sit on both sides of the split;
* ``finetune_share`` > 0 splits the corpus into two domains by package: a ``pretrain`` part (the
  standard library and most packages) and a ``finetune`` part (the packages whose name hashes
  into that share), for runs that continue training on a new domain;
* a deterministic split by file: every ``heldout_every``-th file of the sorted list is held out;
* an optional byte budget per split, filled in a fixed pseudo-random file order (a hash of the
  path), so a small budget still samples the whole library and a larger budget is a superset;
* a byte-level BPE tokenizer (``tokenizers``) trained on the training split only (at most
  ``tokenizer_bytes`` of it), on the spot, and cached with the encoded token streams under
  ``$CGGR_HOOK_CACHE`` (default ``$XDG_CACHE_HOME/cggr_hook``, else ``~/.cache/cggr_hook``;
  ``--cache-dir`` overrides), keyed by the vocabulary size and a hash of the file list.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

EOS = "<|endoftext|>"
TEST_DIR_NAMES = {"test", "tests", "idle_test"}
SKIP_DIR_NAMES = {"site-packages", "dist-packages", "__pycache__"}
FORMAT_VERSION = 2  # bump when the cached files change meaning


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
    """Token streams of the two splits, and the tokenizer that made them.

    ``parts`` holds, when the corpus was built with a ``finetune_share``, the streams of each
    domain: ``parts['pretrain']`` and ``parts['finetune']``, each a (train, held-out) pair; the
    whole-corpus streams are their concatenation."""

    train_tokens: torch.Tensor  # (N,) int32
    heldout_tokens: torch.Tensor  # (M,) int32
    vocab_size: int
    tokenizer_path: Path
    info: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)

    @property
    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))

    def part(self, name: str | None) -> Corpus:
        """The corpus of one domain (``'pretrain'`` or ``'finetune'``), sharing the tokenizer;
        the whole corpus for None."""
        if name is None:
            return self
        if name not in self.parts:
            raise ValueError(
                f"no part {name!r}: build the corpus with finetune_share > 0 (parts: {sorted(self.parts)})"
            )
        train, held = self.parts[name]
        return Corpus(train, held, self.vocab_size, self.tokenizer_path, dict(self.info, part=name))

    def train_sequences(self, seq_len: int) -> torch.Tensor:
        """The training stream cut into non-overlapping ``(n, seq_len)`` int64 rows."""
        n = self.train_tokens.numel() // seq_len
        if n == 0:
            raise ValueError(
                f"the training stream ({self.train_tokens.numel()} tokens) is shorter than seq_len={seq_len}"
            )
        return self.train_tokens[: n * seq_len].view(n, seq_len).long()

    def heldout_sequences(self, seq_len: int) -> torch.Tensor:
        """The whole held-out stream as ``(n, seq_len)`` int64 rows (the last, partial row dropped:
        fewer than ``seq_len`` tokens)."""
        n = self.heldout_tokens.numel() // seq_len
        if n == 0:
            raise ValueError(
                f"the held-out stream ({self.heldout_tokens.numel()} tokens) is shorter than seq_len={seq_len}"
            )
        return self.heldout_tokens[: n * seq_len].view(n, seq_len).long()

    def batches(self, batch_size: int, seq_len: int, seed: int = 0, steps: int | None = None) -> Iterator[torch.Tensor]:
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


SOURCES = ("stdlib", "python")
MAX_FILE_BYTES = 1_000_000  # a larger .py file in site-packages is generated data, not code
TOKENIZER_BYTES = 64_000_000  # the tokenizer learns from at most this much of the training split


def site_roots() -> list[Path]:
    """The installed packages' folders (``purelib`` and ``platlib``; one when they coincide)."""
    paths = sysconfig.get_paths()
    roots: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p.resolve() not in {r.resolve() for r in roots}:
            roots.append(p)
    return roots


def list_site_files(
    root: Path, include_tests: bool = False, max_file_bytes: int = MAX_FILE_BYTES
) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every ``.py`` file of installed packages under ``root`` (test
    folders skipped unless asked for, files over ``max_file_bytes`` skipped), sorted by path."""
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = {"__pycache__"} | (set() if include_tests else TEST_DIR_NAMES)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in skip and not d.startswith(".") and not d.endswith((".dist-info", ".egg-info"))
        )
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if 0 < size <= max_file_bytes:
                found.append((path.relative_to(root).as_posix(), size))
    found.sort()
    return found


def list_source_files(
    sources: str = "stdlib", include_tests: bool = False
) -> tuple[dict[str, Path], list[tuple[str, int]]]:
    """(roots by tag, files): files are ``('<tag>/<relative path>', size)``, sorted; tags are
    ``stdlib`` and, for ``sources='python'``, ``site<i>`` for each packages folder."""
    if sources not in SOURCES:
        raise ValueError(f"sources={sources!r}: use one of {SOURCES}")
    roots = {"stdlib": stdlib_root()}
    files = [(f"stdlib/{rel}", size) for rel, size in list_stdlib_files(roots["stdlib"], include_tests)]
    if sources == "python":
        for i, root in enumerate(site_roots()):
            roots[f"site{i}"] = root
            files += [(f"site{i}/{rel}", size) for rel, size in list_site_files(root, include_tests)]
    files.sort()
    return roots, files


def domain_of(key: str) -> str:
    """The package a file belongs to: ``stdlib`` for the standard library, else the top-level
    name under the packages folder (a module file without its ``.py``)."""
    tag, _, rel = key.partition("/")
    if tag == "stdlib":
        return "stdlib"
    top = rel.split("/", 1)[0]
    return top[:-3] if top.endswith(".py") else top


def in_finetune_part(domain: str, share: float) -> bool:
    """Whether a package belongs to the fine-tuning domain: a fixed hash of its name below
    ``share`` (the standard library never does). The same on every machine."""
    if domain == "stdlib" or share <= 0:
        return False
    return int(hashlib.sha1(domain.encode()).hexdigest()[:8], 16) / 0x100000000 < share


def _read_key(roots: dict[str, Path], key: str) -> bytes:
    tag, _, rel = key.partition("/")
    return (roots[tag] / rel).read_bytes()


def load_corpus(
    vocab_size: int = 16384,
    max_bytes: int | None = None,
    max_heldout_bytes: int | None = None,
    heldout_every: int = 10,
    include_tests: bool = False,
    cache_dir: str | Path | None = None,
    verbose: bool = False,
    sources: str = "stdlib",
    finetune_share: float = 0.0,
    tokenizer_bytes: int | None = TOKENIZER_BYTES,
) -> Corpus:
    """Build (or read from the cache) the tokenizer and the token streams.

    ``max_bytes`` caps the training split's bytes (all files when None); ``max_heldout_bytes``
    caps the held-out split (default: the same proportion); ``tokenizer_bytes`` caps what the
    tokenizer learns from. ``sources`` and ``finetune_share``: see the module's docstring.
    Files of identical content are kept once (the first by path) before the split.
    """
    roots, files = list_source_files(sources, include_tests)
    if not files:
        raise RuntimeError(f"no .py files found under {[str(r) for r in roots.values()]}")
    h = hashlib.sha1()
    h.update(
        f"v{FORMAT_VERSION}\n{sources}\n{finetune_share}\n{tokenizer_bytes}\n{heldout_every}\n"
        f"{max_bytes}\n{max_heldout_bytes}\n".encode()
    )
    for rel, size in files:
        h.update(f"{rel}\t{size}\n".encode())
    key = f"{sources}-v{vocab_size}-{h.hexdigest()[:16]}"
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tok_path = cache / f"{key}.tokenizer.json"
    data_path = cache / f"{key}.tokens.pt"
    if tok_path.exists() and data_path.exists():
        data = torch.load(data_path)
        info = dict(data["info"], cached=True)
        return Corpus(data["train"], data["heldout"], vocab_size, tok_path, info, data.get("parts", {}))

    t0 = time.perf_counter()
    # content-level de-duplication before the split: vendored copies of a module must not land
    # on both sides of it
    seen: set[str] = set()
    texts: dict[str, str] = {}
    unique: list[tuple[str, int]] = []
    for rel, size in files:
        try:
            raw = _read_key(roots, rel)
        except OSError:
            continue
        digest = hashlib.sha1(raw).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        texts[rel] = raw.decode("utf-8", errors="replace")
        unique.append((rel, size))
    train, held = split_files(unique, heldout_every, max_bytes, max_heldout_bytes)
    if not train or not held:
        raise RuntimeError("the byte budget left a split empty: raise max_bytes")
    tune = {rel for rel, _ in unique if in_finetune_part(domain_of(rel), finetune_share)}
    if finetune_share > 0 and not (tune & {r for r, _ in train} and tune & {r for r, _ in held}):
        raise RuntimeError(f"finetune_share={finetune_share} put no package's files in both splits: raise it")
    groups = {
        "pretrain": ([r for r, _ in train if r not in tune], [r for r, _ in held if r not in tune]),
        "finetune": ([r for r, _ in train if r in tune], [r for r, _ in held if r in tune]),
    }
    info = {
        "sources": sources,
        "roots": {tag: str(root) for tag, root in roots.items()},
        "key": key,
        "vocab_size": vocab_size,
        "files_found": len(files),
        "duplicates_dropped": len(files) - len(unique),
        "train_files": len(train),
        "heldout_files": len(held),
        "train_bytes": sum(s for _, s in train),
        "heldout_bytes": sum(s for _, s in held),
        "finetune_share": finetune_share,
    }
    if finetune_share > 0:
        info["finetune_packages"] = sorted({domain_of(r) for r in tune})
    if tok_path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
    else:
        sample = _budget(train, tokenizer_bytes)  # a fixed pseudo-random subset of the training files
        tok = train_tokenizer([texts[rel] for rel, _ in sample], vocab_size)
        tmp = tok_path.with_name(f"{tok_path.name}.{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, tok_path)
    t1 = time.perf_counter()
    eos_id = tok.token_to_id(EOS)
    streams = {
        name: tuple(_encode(tok, [texts[r] for r in group], eos_id) for group in pair) for name, pair in groups.items()
    }
    train_ids = torch.cat([streams["pretrain"][0], streams["finetune"][0]])
    held_ids = torch.cat([streams["pretrain"][1], streams["finetune"][1]])
    parts = streams if finetune_share > 0 else {}
    t2 = time.perf_counter()
    info.update(
        train_tokens=int(train_ids.numel()),
        heldout_tokens=int(held_ids.numel()),
        tokenizer_seconds=round(t1 - t0, 2),
        encode_seconds=round(t2 - t1, 2),
        actual_vocab_size=tok.get_vocab_size(),
    )
    if parts:
        info["part_tokens"] = {name: [int(t.numel()) for t in pair] for name, pair in parts.items()}
    _atomic_save({"train": train_ids, "heldout": held_ids, "parts": parts, "info": dict(info)}, data_path)
    if verbose:
        print(f"stdlib_text: tokenizer {t1 - t0:.1f}s, encoding {t2 - t1:.1f}s -> {data_path}")
    info["cached"] = False
    return Corpus(train_ids, held_ids, vocab_size, tok_path, info, parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--max-bytes", type=int, default=None, help="training-split byte budget (default: all)")
    p.add_argument("--max-heldout-bytes", type=int, default=None)
    p.add_argument("--include-tests", action="store_true")
    p.add_argument(
        "--sources",
        choices=SOURCES,
        default="stdlib",
        help="stdlib: the standard library; python: it and every installed package",
    )
    p.add_argument(
        "--finetune-share",
        type=float,
        default=0.0,
        help="share of the packages set apart as a fine-tuning domain (0: none)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="default: $CGGR_HOOK_CACHE, else $XDG_CACHE_HOME/cggr_hook, else ~/.cache/cggr_hook",
    )
    args = p.parse_args()
    t0 = time.perf_counter()
    corpus = load_corpus(
        args.vocab_size,
        args.max_bytes,
        args.max_heldout_bytes,
        include_tests=args.include_tests,
        cache_dir=args.cache_dir,
        verbose=True,
        sources=args.sources,
        finetune_share=args.finetune_share,
    )
    info = dict(corpus.info, seconds=round(time.perf_counter() - t0, 2))
    print(json.dumps(info, indent=2))
    sample = corpus.tokenizer.decode(corpus.heldout_tokens[:48].tolist())
    print("held-out sample:", repr(sample))


if __name__ == "__main__":
    main()
