"""`make bench-speed`: decode and prompt speed against llama.cpp, and the memory floor.

llama.cpp is built from the source inside the `llama-cpp-python` sdist on PyPI (its vendored
llama.cpp, with the RPC backend: llama-bench and ggml-rpc-server), and the same checkpoints
are converted to GGUF F32 with its convert_hf_to_gguf.py in a separate virtualenv (gguf-py,
transformers 4.57 and sentencepiece installed there; torch is borrowed from this project's
environment through a .pth file, to avoid a second 700 MB torch). Everything built lives
under the cache folder (default ~/.cache/edgeshard-llamacpp), never in the checkout.

Measured in one run, interleaved round by round (medians of the rounds), 1 thread per
process, and 1 process of each tool at 2 threads (`--threads 1,2`, the default: the full
table at the first count, the 1-process rows at the others), on a random Llama of hidden
512, 8 layers, vocab 32000 (58M parameters, 232 MB fp32; saved as a Hugging Face checkpoint
so that both tools read the same weights) and on the trained stories260K:
- llama.cpp: 1 process; main + 1 and main + 3 RPC servers (-ngl 99: the layers are spread
  over the servers), `llama-bench` tg (decode) and pp (prompt) speed;
- this project: 1, 2 and 4 ranks (even partition), decode ms/token from the token times
  (prefill excluded, as llama-bench's tg), prompt tokens/s from the prefill;
- one core's memory read bandwidth (a plain sum over 256 MB) and the floor it implies:
  the bytes a decode step streams (every weight but the embedding table, of which one row
  is read) / bandwidth.
Skips with the reason when llama.cpp cannot be built here (no cmake/compiler, no network
for the sdist); the project's own figures are printed anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from .common import data_dir, median, run_job
from .overhead import hop_transport_ms

RANKS = (1, 2, 4)
CACHE = Path(os.environ.get("EDGESHARD_LLAMACPP_CACHE", Path.home() / ".cache/edgeshard-llamacpp"))
SDIST = "llama-cpp-python"
TARGETS = ("llama-bench", "ggml-rpc-server")


class Skip(Exception):
    """llama.cpp cannot be had here: the reason."""


def _run(cmd, log: Path, cwd=None, timeout=3600) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise Skip(f"{cmd[0]} failed ({proc.returncode}); see {log}")


def build_llamacpp(cache: Path = CACHE) -> dict:
    """Download the sdist, build llama-bench and ggml-rpc-server (nice, 2 jobs); cached."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise Skip(f"no {tool} on PATH: cannot build llama.cpp")
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        _run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             SDIST, "-d", str(cache)],
            log,
        )  # fmt: skip
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        raise Skip(f"pip download {SDIST} gave no sdist; see {log}")
    top = cache / sdists[-1].name.removesuffix(".tar.gz")
    if not top.is_dir():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(cache, filter="data")
    src = top / "vendor" / "llama.cpp"
    build = src / "build"
    bins = {t: build / "bin" / t for t in TARGETS}
    if not all(b.is_file() for b in bins.values()):
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        _run(
            [*nice, "cmake", "-S", str(src), "-B", str(build), "-DGGML_RPC=ON",
             "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF"],
            log,
        )  # fmt: skip
        _run([*nice, "cmake", "--build", str(build), "-j2", "--target", *TARGETS], log)
    return {"src": src, "version": top.name, **bins}


def gguf_python(src: Path, cache: Path = CACHE) -> Path:
    """A separate virtualenv for convert_hf_to_gguf.py (its pinned transformers 4.x)."""
    venv = cache / "gguf-venv"
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.is_file():
        log = cache / "venv.log"
        _run([sys.executable, "-m", "venv", str(venv)], log)
        _run(
            [str(py), "-m", "pip", "install", "-q", str(src / "gguf-py"), "transformers==4.57.6",
             "sentencepiece>=0.1.98,<0.3.0", "protobuf>=4.21.0,<5.0.0", "safetensors", "numpy"],
            log,
        )  # fmt: skip
        import torch

        site = Path(torch.__file__).parents[1]
        venv_site = next((venv / "lib").glob("python*/site-packages"))
        # Appended to sys.path, after the venv's own packages: only torch comes from here.
        (venv_site / "zz_project_torch.pth").write_text(f"{site}\n")
        stamp.touch()
    return py


def save_random_llama(path: Path) -> Path:
    """The 232 MB model as a Hugging Face checkpoint (seeded synthetic weights)."""
    if (path / "model.safetensors").is_file():
        return path
    from ..model import reference_model
    from ..presets import ModelSpec
    from ..weights import SyntheticWeights

    spec = ModelSpec("rand-232m", 512, 8, 8, 8, 1376, 32000, max_position_embeddings=2048)
    model = reference_model(spec, SyntheticWeights(spec, 0))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok = data_dir_any() / "llama2-tokenizer" / "tokenizer.model"
    if tok.is_file() and not (path / "tokenizer.model").exists():
        (path / "tokenizer.model").symlink_to(tok.resolve())  # the converter needs a vocab
    return path


def data_dir_any() -> Path:
    return Path(os.environ.get("EDGESHARD_DATA", "../shared/data"))


def to_gguf(py: Path, src: Path, hf_dir: Path, out: Path) -> Path:
    if not out.is_file():
        _run(
            [str(py), str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
             "--outfile", str(out)],
            out.with_suffix(".log"),
        )  # fmt: skip
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_bench(
    lc: dict, gguf: Path, servers: int, n_gen: int, n_prompt: int, threads: int = 1
) -> tuple:
    """(decode ms/token, prompt tokens/s) of llama-bench with `servers` RPC servers."""
    procs, ports = [], []
    try:
        for _ in range(servers):
            port = _free_port()
            procs.append(
                subprocess.Popen(
                    [
                        str(lc["ggml-rpc-server"]),
                        "-H",
                        "127.0.0.1",
                        "-p",
                        str(port),
                        "-t",
                        str(threads),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            ports.append(port)
        for port in ports:  # wait until each server listens
            for _ in range(100):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
        cmd = [str(lc["llama-bench"]), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
               "-p", str(n_prompt), "-n", str(n_gen)]  # fmt: skip
        if servers:
            cmd += ["--rpc", ",".join(f"127.0.0.1:{p}" for p in ports), "-ngl", "99"]
        else:
            cmd += ["-ngl", "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {proc.stderr[-2000:]}")
        rows = json.loads(proc.stdout)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    tg = next(r for r in rows if r["n_gen"] > 0)
    pp = next(r for r in rows if r["n_prompt"] > 0)
    return 1e3 / tg["avg_ts"], pp["avg_ts"]


def project(
    n: int,
    model: str,
    kernels: str,
    out: Path,
    n_gen: int,
    n_prompt: int,
    prompts: int,
    env: dict | None = None,
    threads: int = 1,
) -> tuple:
    """(decode ms/token, prompt tokens/s, run) of this project on n ranks, `threads` each."""
    job = {
        "name": f"speed-{n}",
        "model": {"source": model},
        "workload": {
            "tokenizer": "bytes",
            "prompts": prompts,
            "batch_size": 1,
            "prompt_tokens": n_prompt,
            "new_tokens": n_gen,
            "fallback": "builtin",
        },
        "partition": {"strategy": "even"},
        "runtime": {"threads": threads, "kernels": kernels},
        "output": {"path": str((out / f"r{n}-{kernels}.h5").resolve()), "events": True},
    }
    data = data_dir()
    if data is not None:
        job["workload"]["dataset"] = str((data / "wikitext-2-raw-v1" / "wiki.test.raw").resolve())
    run = run_job(n, job, out / f"r{n}-{kernels}.toml", env=env)
    tt = run["workload"]["token_time_s"]  # [groups, steps]
    decode = np.median((tt[:, -1] - tt[:, 0]) / (tt.shape[1] - 1)) * 1e3
    prefill = np.median(tt[:, 0] - run["workload"]["group_start_s"])
    return float(decode), float(n_prompt / prefill), run


def read_bandwidth(mb: int = 256, repeats: int = 7, threads: int = 1) -> float:
    """Bytes/s `threads` cores read (one by default): a plain sum over a buffer far larger
    than the caches."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(mb * 2**20 // 4)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0))
    return best


def native_status() -> tuple[bool, str]:
    """(whether the opt-in native decode product builds here, a line saying so)."""
    from .. import native

    path = native.build()
    if path is None:
        return False, f"unavailable: {native.REASON}"
    return True, f"built ({path})"


def streamed_bytes(model: str) -> int:
    """Weight bytes a decode step reads: all but the embedding table (one row of it)."""
    from ..presets import resolve

    spec = resolve(model)
    return sum(spec.unit_weight_bytes(u) for u in range(1, spec.n_units))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/bench-speed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument(
        "--threads",
        default="1,2",
        help="threads per process, both tools: the full table at the first, 1 process of "
        "each tool (fast kernels) at the others (default 1,2)",
    )
    ap.add_argument(
        "--kernels",
        default="fast,exact",
        help="kernels to run: the first at 1/2/4 ranks, the rest at 1",
    )
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = data_dir_any()
    models = {"232 MB model": save_random_llama(out / "models" / "rand-232m")}
    stories = data / "stories260K-hf"
    if (stories / "model.safetensors").is_file():
        models["stories260K"] = stories.resolve()
    try:
        lc = build_llamacpp()
        py = gguf_python(lc["src"])
        ggufs = {k: to_gguf(py, lc["src"], p, out / "models" / f"{p.name}-f32.gguf")
                 for k, p in models.items()}  # fmt: skip
        print(f"llama.cpp: {lc['version']} (vendored), built in {lc['src'] / 'build'}")
    except Skip as e:
        lc, ggufs = None, {}
        print(f"bench-speed: llama.cpp skipped: {e}")
    kernels = args.kernels.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    from ..kernels import BLAS_CORE  # what the ranks' numpy BLAS runs (same environment)

    print(f"numpy's OpenBLAS kernels: {BLAS_CORE} (OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', 'unset')})")  # fmt: skip
    native_ok, native_line = native_status()
    print(f"native decode product (opt-in, EDGESHARD_NATIVE=1; its own rows below): {native_line}")
    rows: dict[tuple, list] = {}
    for rnd in range(args.rounds):
        for name, path in models.items():
            g, p, t = args.new_tokens, args.prompt_tokens, threads[0]
            if lc is not None:
                for servers in (0, 1, 3):
                    key = (name, f"llama.cpp, main + {servers} RPC" if servers else "llama.cpp, 1")
                    rows.setdefault(key, []).append(llama_bench(lc, ggufs[name], servers, g, p, t))
            for k in kernels:
                for n in RANKS if k == kernels[0] else (1,):
                    dec, pp, run = project(n, str(path), k, out, g, p, args.prompts, threads=t)
                    tokens = run["summary"]["@generated_tokens"]
                    compute = run["ranks"]["compute_s"].sum() / tokens * 1e3
                    hop = hop_transport_ms(run) if n > 1 else 0.0
                    rows.setdefault((name, f"this project ({k}), {n} rank"), []).append(
                        (dec, pp, hop, compute)
                    )
            for t in threads[1:]:  # 1 process of each tool at t threads
                if lc is not None:
                    rows.setdefault((name, f"llama.cpp, 1, {t} threads"), []).append(
                        llama_bench(lc, ggufs[name], 0, g, p, t)
                    )
                dec, pp, _ = project(1, str(path), kernels[0], out, g, p, args.prompts, threads=t)
                rows.setdefault((name, f"this project ({kernels[0]}), 1 rank, {t} threads"),
                                []).append((dec, pp))  # fmt: skip
                if native_ok and kernels[0] == "fast":  # the opt-in native decode product
                    dec, pp, _ = project(1, str(path), "fast", out, g, p, args.prompts,
                                         env={"EDGESHARD_NATIVE": "1"}, threads=t)  # fmt: skip
                    rows.setdefault((name, f"this project (fast, native), 1 rank, {t} threads"),
                                    []).append((dec, pp))  # fmt: skip
        last = {" | ".join(k): [round(x, 3) for x in v[-1]] for k, v in rows.items()}
        print(f"  round {rnd + 1}/{args.rounds}: {json.dumps(last)}", flush=True)
    med = {k: tuple(median(col) for col in zip(*vs, strict=True)) for k, vs in rows.items()}
    bw = read_bandwidth()
    bw_at = {t: read_bandwidth(threads=t) for t in threads[1:]}
    report(med, models, bw, kernels, lc is not None, threads, bw_at)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "bandwidth_bytes_per_s": bw,
                "bandwidth_bytes_per_s_at_threads": bw_at,
                "native": native_line,
                "blas_core": BLAS_CORE,
                "rounds": {" | ".join(k): v for k, v in rows.items()},
                "median": {" | ".join(k): v for k, v in med.items()},
            },
            indent=2,
        )
    )
    print(f"wrote {out / 'summary.json'}")


def report(
    med: dict,
    models: dict,
    bw: float,
    kernels: list,
    have_lc: bool,
    thread_counts: list,
    bw_at: dict | None = None,
) -> None:
    names = list(models)
    threads = thread_counts[0]
    head = f"ms per generated token ({threads} thread(s) per process; medians of rounds)"
    print(f"\n| {head} | {' | '.join(names)} |")
    configs = []
    if have_lc:
        configs += ["llama.cpp, 1", "llama.cpp, main + 1 RPC", "llama.cpp, main + 3 RPC"]
    configs += [
        f"this project ({k}), {n} rank"
        for k in kernels
        for n in (RANKS if k == kernels[0] else (1,))
    ]
    for c in configs:
        cells = []
        for m in names:
            dec = med[(m, c)][0]
            ref = med.get((m, "llama.cpp, 1"))
            ratio = (
                f" ({dec / ref[0]:.2f}x)"
                if ref and c.startswith("this") and c.endswith(", 1 rank")
                else ""
            )
            cells.append(f"{dec:.3f}{ratio}")
        print(f"| {c} | {' | '.join(cells)} |")
    for m in names:
        k = kernels[0]
        one = med[(m, f"this project ({k}), 1 rank")]
        for n in RANKS[1:]:
            many = med[(m, f"this project ({k}), {n} rank")]
            print(
                f"{m}, {k}: {n} ranks add {(many[0] - one[0]) / (n - 1):.3f} ms per extra rank "
                f"(per hop: transport {many[2]:.3f} ms, send start to receive end; summed "
                f"compute +{(many[3] - one[3]) / (n - 1):.3f} ms per extra rank)"
            )
        if have_lc:
            one = med[(m, "llama.cpp, 1")][0]
            for s in (1, 3):
                d = med[(m, f"llama.cpp, main + {s} RPC")][0]
                print(f"{m}, llama.cpp: main + {s} adds {(d - one) / s:.3f} ms per extra process")
    print(f"\nprompt processing, tokens/s (1 process or rank, {threads} thread(s))")
    for m in names:
        cells = [f"this project ({k}) {med[(m, f'this project ({k}), 1 rank')][1]:.0f}"
                 for k in kernels]  # fmt: skip
        if have_lc:
            cells.insert(0, f"llama.cpp {med[(m, 'llama.cpp, 1')][1]:.0f}")
        print(f"{m}: " + ", ".join(cells))
    for t in thread_counts[1:]:
        print(f"\n{t} threads per process (1 process of each tool, {kernels[0]} kernels)")
        for m in names:
            ours = med[(m, f"this project ({kernels[0]}), 1 rank, {t} threads")]
            line = f"{m}: this project {ours[0]:.3f} ms/token, prompt {ours[1]:.0f} tokens/s"
            ref = med.get((m, f"llama.cpp, 1, {t} threads"))
            nat = med.get((m, f"this project (fast, native), 1 rank, {t} threads"))
            if nat:
                line += f"; with the native product {nat[0]:.3f} ms/token"
                if ref:
                    line += f" ({nat[0] / ref[0]:.2f}x)"
            if ref:
                line += (
                    f"; llama.cpp {ref[0]:.3f} ms/token, prompt {ref[1]:.0f} tokens/s; "
                    f"decode {ours[0] / ref[0]:.2f}x, prompt {ours[1] / ref[1]:.2f}x"
                )
            if bw_at and t in bw_at:
                floor = streamed_bytes(str(models[m])) / bw_at[t] * 1e3
                line += f"; {t} cores read {bw_at[t] / 1e9:.1f} GB/s, floor {floor:.3f} ms/token"
            print(line)
    print(f"\none core reads {bw / 1e9:.1f} GB/s (sum over 256 MB)")
    for m, path in models.items():
        floor = streamed_bytes(str(path)) / bw * 1e3
        cells = [f"this project ({k}) {med[(m, f'this project ({k}), 1 rank')][0]:.3f}"
                 for k in kernels]  # fmt: skip
        if have_lc:
            cells.insert(0, f"llama.cpp {med[(m, 'llama.cpp, 1')][0]:.3f}")
        print(f"{m}: floor {floor:.3f} ms/token ({streamed_bytes(str(path)) / 1e6:.1f} MB "
              f"streamed per token); " + ", ".join(cells))  # fmt: skip


if __name__ == "__main__":
    main()
