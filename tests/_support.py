"""Helpers for the foundation tests: fixture builders (rank1tools.synthetic, which saves through
safetensors / huggingface_hub), and independent yardsticks (safetensors' own reader, file snapshots,
CLI processes). Nothing here uses rank1tools' reader or writer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from rank1tools.synthetic import LlamaShape, checkpoint_tensors, make_base, make_run, write_model

# Same-width integer dtype for bit-exact comparisons (torch.equal on floats treats -0.0 == 0.0
# and NaN != NaN; comparing the bit patterns does not).
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

SAFETENSORS_CODE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern as a same-shaped integer tensor."""
    return t.contiguous().view(_INT_OF_WIDTH[t.element_size()])


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert torch.equal(bits(actual), bits(expected)), f"{what}: bits differ"


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")


@dataclass
class RefTensor:
    shard: str
    dtype_code: str
    shape: tuple[int, ...]
    tensor: torch.Tensor  # as safetensors returns it, stored dtype


def reference_tensors(folder: Path) -> dict[str, RefTensor]:
    """Every tensor of every .safetensors file in `folder`, read by safetensors.safe_open."""
    out: dict[str, RefTensor] = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} stored twice"
                sl = f.get_slice(name)
                out[name] = RefTensor(path.name, sl.get_dtype(), tuple(sl.get_shape()), f.get_tensor(name))
    return out


def shard_metadata(path: Path) -> dict | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, sha256) of every file under root; dirs as ('dir',...)."""
    root = Path(root)
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), root)] = ("dir",)
        for fn in filenames:
            p = Path(dirpath) / fn
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "link"
            snap[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, digest)
    return snap


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANK1_DEBUG", None)
    env["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def start_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `rank1 ARGS` exactly as the console script does (rank1tools.cli.main) in a subprocess
    (`env`: variables added to its environment)."""
    return subprocess.Popen(
        [sys.executable, "-m", "rank1tools.cli", *map(str, args)],
        cwd=str(cwd),
        env={**cli_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_paused(args: list[str], cwd: Path, phase: str) -> tuple[subprocess.Popen, list[str]]:
    """Start `rank1 ARGS` with RANK1_TEST_PAUSE=`phase` (rank1tools.signals) and wait until it has
    stopped there; returns the process and the stderr lines read so far. Fails when the run ends
    without reaching the phase."""
    proc = start_cli(args, cwd, env={"RANK1_TEST_PAUSE": phase})
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(f"rank1: test pause: {phase}"):
            return proc, lines
    proc.wait()
    raise AssertionError(
        f"rank1 {' '.join(map(str, args))} ended (exit {proc.returncode}) without pausing at "
        f"{phase!r}: {''.join(lines)}"
    )


def finish_paused(proc: subprocess.Popen, lines: list[str], sig: int, timeout: float = 120) -> CliResult:
    """Send `sig` to a process from start_paused (SIGUSR1 resumes it) and wait for its end."""
    proc.send_signal(sig)
    r = finish_cli(proc, timeout)
    return CliResult(r.returncode, r.stdout, "".join(lines) + r.stderr)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def finish_cli(proc: subprocess.Popen, timeout: float = 120) -> CliResult:
    out, err = proc.communicate(timeout=timeout)
    return CliResult(proc.returncode, out, err)


def run_cli(args: list[str], cwd: Path) -> CliResult:
    return finish_cli(start_cli(args, cwd))


def run_cli_many(jobs: dict[str, tuple[list[str], Path]]) -> dict[str, CliResult]:
    """Run several `rank1` processes, at most one per CPU core at a time (each pays the torch import)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run_cli, args, cwd) for name, (args, cwd) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# ---- fixture builders ----

# Small enough that every fixture has several shards (the largest tensor, 160x64 fp32, is 40,960 bytes).
SMALL_SHARD = "40KB"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelFixture:
    path: Path
    shape: LlamaShape
    dtype: torch.dtype
    sharded: bool

    @property
    def tie(self) -> bool:
        return self.shape.tie


def build_model(
    folder: Path, *, dtype: torch.dtype = torch.float32, tie: bool = False, sharded: bool = False, seed: int = 0
) -> ModelFixture:
    shape = LlamaShape(tie=tie)
    make_base(folder, shape, dtype, seed=seed, max_shard_size=SMALL_SHARD if sharded else None)
    return ModelFixture(Path(folder), shape, dtype, sharded)


def build_checkpoint(
    folder: Path,
    *,
    shape: LlamaShape = LlamaShape(),
    dtype: torch.dtype = torch.float32,
    step: int = 10,
    t_max: int = 100,
    tensors_edit=None,
    sharded: bool = False,
) -> Path:
    """One RL checkpoint of `shape` (optionally with its tensor dict edited before saving)."""
    tensors = checkpoint_tensors(shape, step, t_max, torch.float32, dtype)
    if tensors_edit is not None:
        tensors = tensors_edit(tensors)
    return write_model(folder, tensors, shape.config(dtype), SMALL_SHARD if sharded else None)


def copy_model(src: ModelFixture | Path, dst: Path) -> Path:
    shutil.copytree(src.path if isinstance(src, ModelFixture) else src, dst)
    return dst


def build_run(run_dir: Path, steps: list[int], layout: str, **kw) -> Path:
    return make_run(run_dir, steps, LlamaShape(), layout=layout, **kw)


def run_main(*args: str) -> CliResult:
    """`rank1 ARGS` in this process through rank1tools.cli.main (the console script's entry point,
    with its exit-code and stderr mapping), without a torch import per call."""
    import contextlib
    import io

    from rank1tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["rank1", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue())


def build_tiny_llama_line_run(root: Path, transformers, steps=(10, 20, 30, 40)) -> Path:
    """root/base/ (a 2-layer Llama built by transformers, with the demo tokenizer) and
    root/run/checkpoint-{steps}/: its weights on a line (seeded direction) plus noise of 0.02."""
    from rank1tools.demo.tokenizer import VOCAB, write_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    write_tokenizer(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
    with torch.no_grad():
        for s in steps:
            for k, p in model.state_dict().items():
                p.copy_(base[k] + s * direction[k] + 0.02 * torch.randn(p.shape, generator=g))
            model.save_pretrained(root / "run" / f"checkpoint-{s}")
    return root
