"""GGUF export checked by llama.cpp itself: its tokenization and its greedy continuations equal ours.

llama.cpp is built from the llama-cpp-python source distribution (it vendors llama.cpp), two
targets in one `cmake --build`, cached per version outside the repository so reruns reuse it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from data.shakespeare import shakespeare_documents
from data.tokenizer_training import train_tokenizer
from qwen3 import Qwen3, Qwen3Config, Qwen3Tokenizer, Sampling, generate
from qwen3.gguf import export_gguf
from qwen3.hf import save_pretrained

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen3-pretrain"
TARGETS = ("llama-tokenize", "llama-simple")
# Static and portable (no -march=native: the cache may outlive the CPU), without the network,
# server and test parts: the least that builds the two targets.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_IS_DEV=OFF",
)


def build_llama_cpp(root: Path = CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}") -> Path:
    """The directory holding llama.cpp's `llama-tokenize` and `llama-simple`, built on first use.

    `bin/` appears only once both binaries are built (renamed into place), so an interrupted
    build is redone, never half-used.
    """
    bin_dir = root / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: apt-get install -y cmake g++ (as .ci/run does)")
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(root),
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            ],
            check=True,
        )
    src = root / "src"
    if not src.is_dir():  # extracted beside, then renamed: never half there
        unpacked = root / "src.tmp"
        shutil.rmtree(unpacked, ignore_errors=True)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name.removeprefix(prefix)
            tar.extractall(unpacked, members=members, filter="data")
        os.replace(unpacked, src)
    build = root / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_OPTIONS], check=True)
    subprocess.run(
        [
            "cmake",
            "--build",
            str(build),
            "--config",
            "Release",
            "-j",
            str(os.cpu_count() or 1),
            "--target",
            *TARGETS,
        ],
        check=True,
    )
    staged = root / "bin.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for target in TARGETS:
        shutil.copy2(build / "bin" / target, staged / target)
    os.replace(staged, bin_dir)
    return bin_dir


# Mixed text: CJK, emoji (a ZWJ sequence too), CRLF and blank lines, tabs, contractions in both
# cases (Qwen2's regex matches them case-insensitively), digits, every special token. NFC, as
# llama.cpp applies no normalizer.
MIXED = (
    "Hello world!\n\nROMEO:\nBut soft, what light 🌹 through yonder window breaks?\r\n"
    "日本語のテキストと中文的句子。한국어도 있어요.  spaces\t\ttabs 12345 3.14\n"
    "it's IT'S we'll WE'LL they'D 👩‍👩‍👧 café naïve -- (brackets) «quotes»\n\n\n"
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\n"
    "ok<|im_end|><|endoftext|>   trailing  "
)
PROMPTS = (
    "ROMEO:\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n",
    "<|im_start|>user\nWho is the king of Denmark?<|im_end|>\n<|im_start|>assistant\n",
)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Qwen3, Qwen3Tokenizer]:
    """A tiny random Qwen3 with a BPE tokenizer trained on Shakespeare, exported at f32.

    Weights drawn with std 0.4 (not 0.02) make the logits spread out, so each greedy pick wins
    by a clear margin (over 0.01 here, far above float32 rounding) and the continuations vary
    instead of repeating one token; norms drawn at random too, so a misplaced norm would show.
    """
    plays = shakespeare_documents("train", val_docs=1, val_fraction=0.0)
    tokenizer = train_tokenizer([p[:60_000] for p in plays[:6]] + [MIXED] * 20, 1024)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=1e6,
        initializer_range=0.4,
    )
    model = Qwen3(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    ckpt = tmp_path_factory.mktemp("gguf") / "ckpt"
    save_pretrained(model, ckpt)
    tokenizer.save(ckpt)
    return export_gguf(ckpt, ckpt.parent / "model-f32.gguf", "f32"), model, tokenizer


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_we_do(gguf_model, tmp_path) -> None:
    path, _, tokenizer = gguf_model
    text_file = tmp_path / "mixed.txt"
    text_file.write_bytes(MIXED.encode())
    done = subprocess.run(
        [
            str(build_llama_cpp() / "llama-tokenize"),
            "-m",
            str(path),
            "-f",
            str(text_file),
            "--ids",
            "--no-escape",
            "--log-disable",
        ],
        capture_output=True,
        check=True,
    )
    theirs = [int(i) for i in re.findall(rb"\d+", done.stdout.strip().splitlines()[-1])]
    ours = tokenizer.encode(MIXED)
    assert tokenizer.eos_id in ours and tokenizer.im_start_id in ours  # specials are one id each
    assert theirs == ours


@pytest.mark.slow
def test_llama_cpp_greedy_continuations_equal_ours(gguf_model) -> None:
    path, model, tokenizer = gguf_model
    stops = (tokenizer.eos_id, tokenizer.im_end_id)  # llama.cpp's end-of-generation tokens
    for prompt in PROMPTS:
        (ours,) = generate(
            model,
            [tokenizer.encode(prompt)],
            Sampling(max_new_tokens=NEW_TOKENS, temperature=0, stop_ids=stops),
        )
        done = subprocess.run(
            [
                str(build_llama_cpp() / "llama-simple"),
                "-m",
                str(path),
                "-n",
                str(NEW_TOKENS),
                prompt,
            ],
            capture_output=True,
            check=True,
        )
        # llama-simple prints the prompt's pieces, the new tokens' pieces, then one newline.
        assert done.stdout.startswith(prompt.encode()) and done.stdout.endswith(b"\n")
        theirs = done.stdout[len(prompt.encode()) : -1].decode("utf-8", errors="replace")
        decoded = re.search(rb"decoded (\d+) tokens", done.stderr)
        assert decoded is not None, done.stderr.decode(errors="replace")[-2000:]
        assert int(decoded.group(1)) == len(ours), prompt
        assert theirs == tokenizer.decode(ours), prompt


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_llama_cpp_runs_the_smaller_dtypes(gguf_model, dtype) -> None:
    path, _, _ = gguf_model
    smaller = export_gguf(path.parent / "ckpt", path.parent / f"model-{dtype}.gguf", dtype)
    done = subprocess.run(
        [str(build_llama_cpp() / "llama-simple"), "-m", str(smaller), "-n", "8", PROMPTS[0]],
        capture_output=True,
        check=True,
    )
    assert done.stdout.startswith(PROMPTS[0].encode())
    assert re.search(rb"decoded \d+ tokens", done.stderr)
