"""Fuzz the .dcz reader with forged files whose checksums are all valid, for a time budget.

Run `python fuzz/dcz_fuzz.py --seconds 60 --corpus tests/corpus --out /tmp/found` from the repo
root. It builds small real files (tests/forge.py: every layout, raw dtypes, aliases, a program),
adds the files of --corpus as seeds (the structured mutator only those that load), and forges
inputs: with atheris installed (`pip install atheris`) coverage-guided, libFuzzer mutating the
header JSON text and the stream
bytes of an unpacked form that is re-packed with every CRC recomputed; otherwise (or with
--engine structured) the structured mutator of tests/forge.py. Each input goes through
deepcompress.load_state_dict, deepcompress.load and open_lazy + reading every tensor in a worker
process limited to --memory bytes of address space and --timeout seconds. Any outcome other
than DczError or a clean load (another exception, a timeout, a dead worker, or a structured
forgery the reader accepted) is saved to --out as <class>-<hash>.dcz with a line in
--out/findings.jsonl, and summarized at the end with per-call timings. To add a finding to the
regression corpus, copy it to tests/corpus/<what-is-wrong>.dcz (a few KB; e.g.
zstd-huge-content-size.dcz) and add one line for it to tests/corpus/README.md:
tests/test_forged.py then requires DczError from all three calls and exit 2 from the CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


# --- worker: runs the three calls on one file at a time ----------------------------------------

def worker(memory: int) -> None:
    """Read paths from stdin, answer one JSON line of outcomes each (under an RLIMIT_AS)."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    import forge
    for line in sys.stdin:
        path = line.strip()
        out = {}
        for api in forge.API_CALLS:
            t = time.perf_counter()
            out[api] = forge.call_api(api, path)
            out[f"{api}_s"] = round(time.perf_counter() - t, 4)
        print(json.dumps(out), flush=True)


class Worker:
    """A persistent worker process; restarted after a timeout or a crash."""

    def __init__(self, memory: int, timeout: float):
        self.memory, self.timeout, self.proc = memory, timeout, None

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--memory",
                                      str(self.memory)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, path: Path) -> dict:
        """Outcomes of the three calls on path, or {'died': reason}."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        limit = self.timeout + (30 if not getattr(self, "_warm", False) else 0)
        ready, _, _ = select.select([self.proc.stdout], [], [], limit)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            self._warm = True
            return json.loads(line)
        reason = f"timeout after {limit:.0f} s" if not ready else "worker died"
        self.proc.kill()
        err = self.proc.stderr.read()[-400:] if ready else ""
        self.proc.wait()
        self.proc, self._warm = None, False
        return {"died": f"{reason} {err}".strip()}

    def close(self) -> None:
        """Stop the worker."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


# --- the unpacked form atheris mutates --------------------------------------------------------

def unpack_for_fuzz(data: bytes) -> bytes:
    """A real .dcz as u32 json length, header JSON text, then the stream bytes [16, H)."""
    import forge
    f = forge.Forged.parse(data)
    text = f.header_json()
    return struct.pack("<I", len(text)) + text + b"".join(f.payloads.values())


def repack_for_fuzz(blob: bytes) -> bytes:
    """The .dcz of an unpacked form: every stream CRC fixed where the record allows it, then the
    header, preamble and trailer checksums (offsets and lengths are left as the fuzzer made
    them)."""
    import forge
    import zstandard

    from deepcompress.formats import dcz
    n = struct.unpack_from("<I", blob)[0] if len(blob) >= 4 else 0
    text, body = blob[4:4 + n], blob[4 + n:]
    try:
        doc = json.loads(text)
        records = [s for e in doc.get("tensors", []) if isinstance(e, dict)
                   and isinstance(e.get("streams"), dict) for s in e["streams"].values()]
        if isinstance(doc.get("program"), dict):
            records.append(doc["program"])
        for s in records:
            if isinstance(s, dict) and all(type(s.get(k)) is int and s[k] >= 0
                                           for k in ("offset", "length")):
                start = s["offset"] - 16
                s["crc32"] = zlib.crc32(body[max(start, 0):max(start, 0) + s["length"]])
        text = json.dumps(doc, separators=(",", ":")).encode()
    except (ValueError, TypeError, AttributeError, RecursionError):
        pass
    frame = zstandard.ZstdCompressor(level=1, dict_data=dcz._HEADER_DICT,
                                     write_dict_id=False).compress(text)
    head = forge.MAGIC + struct.pack("<I", 1)
    trailer = struct.pack("<QQQI", 16 + len(body), len(frame), len(text), zlib.crc32(frame))
    return (head + struct.pack("<I", zlib.crc32(head)) + body + frame + trailer
            + struct.pack("<I", zlib.crc32(trailer)))


# --- findings ----------------------------------------------------------------------------------

class Findings:
    """Saves every bad outcome once (by content hash) and keeps timing statistics."""

    def __init__(self, out: Path, per_class: int = 20):
        self.out, self.per_class = out, per_class
        out.mkdir(parents=True, exist_ok=True)
        self.seen: set[str] = set()
        self.count = 0
        self.by_class: dict[str, int] = {}
        self.slowest: dict[str, float] = {}

    def record(self, data: bytes, name: str, expect: str, got: dict,
               reference: dict | None) -> list[str]:
        """Check one outcome; save and return its problems if it is a finding."""
        import forge
        self.count += 1
        for k, v in got.items():
            if k.endswith("_s"):
                self.slowest[k[:-2]] = max(self.slowest.get(k[:-2], 0.0), v)
        if "died" in got:
            problems = [got["died"]]
        else:
            outcomes = {k: v for k, v in got.items() if not k.endswith("_s")}
            problems = forge.verdict(expect, outcomes, reference)
        if not problems:
            return []
        digest = hashlib.sha256(data).hexdigest()[:12]
        if digest in self.seen:
            return []
        self.seen.add(digest)
        cls = _class_of(problems[0])
        self.by_class[cls] = self.by_class.get(cls, 0) + 1
        if self.by_class[cls] > self.per_class:  # counted, not saved again
            return problems
        path = self.out / f"{cls}-{digest}.dcz"
        path.write_bytes(data)
        with open(self.out / "findings.jsonl", "a") as f:
            f.write(json.dumps({"file": path.name, "mutation": name, "expect": expect,
                                "problems": problems}) + "\n")
        print(f"finding {path.name}: {name}: {problems[0][:160]}", flush=True)
        return problems


def _class_of(problem: str) -> str:
    text = problem.split(": ", 1)[-1]
    if text.startswith("timeout"):
        return "timeout"
    if text.startswith("worker died") or "died" in problem[:12]:
        return "died"
    if "loaded without error" in text:
        return "accepted"
    return "".join(c for c in text.split(":", 1)[0] if c.isalnum()) or "other"


# --- engines -----------------------------------------------------------------------------------

def seeds(corpus: Path | None, work: Path) -> dict[str, Path]:
    """The built-in base files and every .dcz of the corpus the forge can take apart."""
    import forge
    found = {f"base:{k}": v for k, v in forge.build_bases(work / "bases").items()}
    for p in sorted(corpus.glob("*.dcz")) if corpus else []:
        try:
            forge.Forged.read(p)
        except Exception:  # a broken corpus file is still a seed for atheris, not for forge
            continue
        found[f"corpus:{p.name}"] = p
    return found


def structured(args: argparse.Namespace, found: Findings, work: Path) -> None:
    """Random structured mutations (tests/forge.py), stacked and byte-level, re-checksummed."""
    import forge
    rng = random.Random(args.seed)
    pool = Worker(args.memory, args.timeout)
    bases, refs = {}, {}
    for k, p in seeds(args.corpus, work).items():
        got = pool.run(p)
        ref = {a: got[a] for a in forge.API_CALLS} if "died" not in got else None
        # mutations say what a reader must do to a changed valid file: a refused seed (every
        # corpus regression) has no such answer, and the forge decodes its streams trusting them
        if ref is not None and all(v.startswith(("ok:", "weights-only")) for v in ref.values()):
            bases[k], refs[k] = forge.Forged.read(p), ref
    deadline = time.monotonic() + args.seconds
    path = work / "case.dcz"
    try:
        while time.monotonic() < deadline:
            key = rng.choice(sorted(bases))
            try:
                m = forge.random_mutation(bases[key], rng, sentinel=str(work / "pickle-ran"))
                if rng.random() < 0.3:  # stack a byte-level edit on top
                    m = _byte_edit(m, rng)
                data = m.data()
            except Exception:  # a stacked edit the forge cannot express: skip it
                continue
            path.write_bytes(data)
            got = pool.run(path)
            if (work / "pickle-ran").exists():
                got = {"died": "a pickle ran"}
                (work / "pickle-ran").unlink()
            found.record(data, f"{key}: {m.name}", m.expect, got, refs.get(key))
    finally:
        pool.close()


def _byte_edit(m: object, rng: random.Random) -> object:
    import forge
    f = m.forged.copy()
    keys = [k for k in f.payloads if f.payloads[k]]
    if not keys:
        return m
    key = rng.choice(keys)
    buf = bytearray(f.payloads[key])
    for _ in range(rng.randint(1, 4)):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    f.set_stream(key, bytes(buf))
    return forge.Mutation(m.name + " + bytes", m.kind, "any" if m.expect != "error" else "error",
                          f)


def atheris_child(args: argparse.Namespace, work: Path) -> None:
    """Coverage-guided fuzzing in this process (libFuzzer kills it on a hang or OOM)."""
    import resource
    import signal

    import atheris
    resource.setrlimit(resource.RLIMIT_AS, (args.memory, args.memory))
    import bitarray  # noqa: F401  (dependencies first: only deepcompress is instrumented)
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import zstandard  # noqa: F401
    with atheris.instrument_imports(include=["deepcompress"]):
        import forge

        import deepcompress  # noqa: F401
    found = Findings(args.out)
    target = work / "atheris.dcz"

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"over {args.timeout} s")

    signal.signal(signal.SIGALRM, alarm)

    def one(blob: bytes) -> None:
        data = repack_for_fuzz(blob)
        target.write_bytes(data)
        got = {}
        signal.alarm(int(args.timeout))
        try:
            for api in forge.API_CALLS:
                got[api] = forge.call_api(api, target)
        finally:
            signal.alarm(0)
        found.record(data, "atheris", "any", got, None)

    seeds_dir = work / "atheris-seeds"
    seeds_dir.mkdir(exist_ok=True)
    for k, p in seeds(args.corpus, work).items():
        try:
            (seeds_dir / k.replace(":", "-")).write_bytes(unpack_for_fuzz(p.read_bytes()))
        except Exception:
            continue
    atheris.Setup([sys.argv[0], str(work / "atheris-corpus"), str(seeds_dir),
                   f"-max_total_time={int(args.seconds)}", f"-timeout={int(args.timeout) + 5}",
                   f"-rss_limit_mb={args.memory >> 20}", "-max_len=65536",
                   f"-artifact_prefix={args.out}/libfuzzer-", f"-seed={args.seed + 1}"], one)
    (work / "atheris-corpus").mkdir(exist_ok=True)
    atheris.Fuzz()


def run_atheris(args: argparse.Namespace, work: Path) -> None:
    """Run atheris in children, restarting after each libFuzzer crash until the budget ends."""
    deadline = time.monotonic() + args.seconds
    while (left := deadline - time.monotonic()) > 5:
        cmd = [sys.executable, __file__, "--atheris-child", "--seconds", str(int(left - 5)),
               "--out", str(args.out), "--work", str(work), "--memory", str(args.memory),
               "--timeout", str(args.timeout), "--seed", str(args.seed)]
        if args.corpus:
            cmd += ["--corpus", str(args.corpus)]
        subprocess.run(cmd, timeout=left + 120)
        for art in args.out.glob("libfuzzer-*"):  # a hang or OOM: keep the repacked .dcz
            if not art.name.endswith(".dcz"):
                data = repack_for_fuzz(art.read_bytes())
                art.with_name(f"{art.name}.dcz").write_bytes(data)
                art.unlink()
                print(f"finding {art.name}.dcz: libFuzzer {art.name.split('-')[1]}", flush=True)
        args.seed += 1


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and fuzz; returns 1 if anything was found."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60, help="time budget (default 60)")
    p.add_argument("--corpus", type=Path, help="folder of .dcz seeds, e.g. tests/corpus")
    p.add_argument("--out", type=Path, default=Path("/tmp/dcz-found"),
                   help="folder for findings and findings.jsonl (default /tmp/dcz-found)")
    p.add_argument("--engine", choices=["auto", "atheris", "structured"], default="auto",
                   help="atheris when installed (auto), or the structured mutator")
    p.add_argument("--memory", type=int, default=2 << 30,
                   help="address-space limit in bytes for the reader (default 2 GB)")
    p.add_argument("--timeout", type=float, default=10, help="seconds per input (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--atheris-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.memory)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="dcz-fuzz-"))
    if args.atheris_child:
        atheris_child(args, work)
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "structured"
    found = Findings(args.out)
    t = time.monotonic()
    if engine == "atheris":
        run_atheris(args, work)
        found.by_class = {}
        for line in (args.out / "findings.jsonl").read_text().splitlines() if (
                args.out / "findings.jsonl").exists() else []:
            cls = json.loads(line)["file"].rsplit("-", 1)[0]
            found.by_class[cls] = found.by_class.get(cls, 0) + 1
    else:
        structured(args, found, work)
    n = len(list(args.out.glob("*.dcz")))
    print(f"{engine}: {time.monotonic() - t:.0f} s, {found.count or 'see libFuzzer'} inputs, "
          f"{n} findings in {args.out}: {json.dumps(found.by_class)}")
    if found.slowest:
        print("slowest call per API (s): " + json.dumps(
            {k: round(v, 3) for k, v in found.slowest.items()}))
    return 1 if n else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
