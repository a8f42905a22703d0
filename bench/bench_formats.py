"""Formats beyond pickle: whole-process time for huge and for many files, and the protobuf reader choice.

    python3 bench/bench_formats.py [--runs 9] [--files 1000] [--nodes 200000]

(a) A 10 GB safetensors file and a 10 GB GGUF file (real headers, data made sparse with
    truncate): `modelscan -p FILE` whole process, target <= 0.1 s. Shown next to
    `python -c pass`, the interpreter's own start-up on this machine.
(b) Directories of N small ONNX, GGUF and pickle files: `modelscan -p DIR` whole process, per
    file; target: ONNX and GGUF no slower than pickles. The GGUF files carry the 21 published
    chat templates in turn (a model cache: many quantizations share one template, analysed
    once per process); `gguf-distinct` gives every file a template of its own (worst case).
(c) SavedModel/GraphDef reader: a GraphDef of many nodes read three ways in child processes,
    time and peak RSS (VmHWM): the old hand-written wire walk (protowire only), one
    `ParseFromString` of the whole message, and the scanner (wire reader splits the repeated
    levels, the protobuf runtime parses each element).

Bytecode is compiled first (as `pip install` does): with PYTHONDONTWRITEBYTECODE set every
run would otherwise recompile the package. Whole-process figures are min and median of
--runs runs; the machine's load shows in the `python -c pass` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = json.loads((ROOT / "tests" / "modelscan_core" / "data" / "chat_templates.json").read_text())
TEMPLATES = [v for k, v in sorted(TEMPLATES.items()) if not k.startswith("_")]


def whole_process(args: list[str], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{args}: exit {done.returncode}")
    return min(times), statistics.median(times)


def scan(path: str, runs: int) -> tuple[float, float]:
    return whole_process(["-m", "modelscan_core", "-p", path], runs)


# -- (a) huge sparse files ------------------------------------------------------------------------


def sparse_safetensors(path: str, size: int) -> None:
    n = size // 4
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + n * 4)


def sparse_gguf(path: str, size: int) -> None:
    import logging

    import gguf
    import numpy as np

    logging.getLogger("gguf").setLevel(logging.ERROR)
    n = size // 2
    w = gguf.GGUFWriter(path, "llama")
    w.add_token_list([f"tok{i}" for i in range(32000)])
    w.add_chat_template(TEMPLATES[0])
    w.add_tensor_info("token_embd.weight", (n,), np.dtype(np.float16), n * 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data_start = -(-os.path.getsize(path) // 32) * 32
    os.truncate(path, data_start + n * 2)


# -- (b) many small files ---------------------------------------------------------------------------


def small_onnx(path: str, i: int) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])
    w = numpy_helper.from_array(np.full(16, i, np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "w"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Mul", ["b", "w"], ["y"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, f"g{i}", [x], [y], initializer=[w])), path)


def small_gguf(path: str, i: int, distinct: bool = False) -> None:
    import logging

    import gguf
    import numpy as np

    logging.getLogger("gguf").setLevel(logging.ERROR)
    w = gguf.GGUFWriter(path, "llama")
    w.add_token_list([f"tok{j}" for j in range(256)])
    template = TEMPLATES[i % len(TEMPLATES)]
    w.add_chat_template(template + f"{{# {i} #}}" if distinct else template)
    w.add_tensor("w", np.full((16, 16), i, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def small_pickle(path: str, i: int) -> None:
    import pickle

    state = {"step": i, "weights": [float(j) for j in range(256)], "config": {"lr": 1e-3, "layers": [16, 16, 4]},
             "names": [f"layer{j}" for j in range(16)]}
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=4)


# -- (c) protobuf readers ----------------------------------------------------------------------------

_READERS = {
    "protowire only (old reader)": """
from modelscan_core.scanners.protowire import fields, LEN, text
buf = open(path, 'rb').read()
ops = {}
for n, w, v, e in fields(buf):
    if n == 1 and w == LEN:
        op = ''
        for n2, w2, v2, e2 in fields(buf, v, e):
            if n2 == 2 and w2 == LEN:
                op = text(buf, v2, e2)
            elif n2 == 5 and w2 == LEN:
                for n3, w3, v3, e3 in fields(buf, v2, e2):
                    if n3 == 2 and w3 == LEN:
                        for n4, w4, v4, e4 in fields(buf, v3, e3):
                            pass
        ops[op] = ops.get(op, 0) + 1
""",
    "whole-message ParseFromString": """
from modelscan_core.scanners.proto import message_class
g = message_class('tensorflow.proto', 'GraphDef')()
g.ParseFromString(open(path, 'rb').read())
ops = {}
for node in g.node:
    ops[node.op] = ops.get(node.op, 0) + 1
    for a in node.attr:
        a.value.s
""",
    "scanner (split + runtime)": """
from modelscan_core.engine import scan_stream
with open(path, 'rb') as f:
    assert scan_stream(f, 'frozen_graph.pb', compute_hash=False).format == 'tf_graphdef'
""",
}


def big_graphdef(path: str, nodes: int) -> None:
    sys.path.insert(0, str(ROOT))
    from modelscan_core.scanners.proto import message_class

    graph = message_class("tensorflow.proto", "GraphDef")()
    payload = b"\0" * 4096  # a Const's tensor, kept by the parser as an unknown field
    for i in range(nodes):
        node = graph.node.add(name=f"layer{i}/op".encode(), op=b"Const" if i % 3 == 0 else b"AddV2")
        node.attr.add(key=b"T").value.s = b"float"
        if i % 3 == 0:
            node.attr.add(key=b"value").value.s = payload
    with open(path, "wb") as f:
        f.write(graph.SerializeToString())


def reader(code: str, path: str) -> tuple[float, int]:
    wrapped = ("import sys,time\npath=sys.argv[1]\nt=time.perf_counter()\n" + code +
               "\nprint(time.perf_counter()-t, [int(l.split()[1])//1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", wrapped, path], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=200_000)
    parser.add_argument("--size-gb", type=float, default=10)
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "modelscan_core")], check=True, stdout=subprocess.DEVNULL)
    tmp = tempfile.mkdtemp(prefix="bench-formats-")
    try:
        base = whole_process(["-c", "pass"], args.runs)
        print(f"python -c pass: {base[0]:.3f} s min, {base[1]:.3f} s median")
        size = int(args.size_gb * 1024**3)
        for name, make in (("safetensors", sparse_safetensors), ("gguf", sparse_gguf)):
            path = os.path.join(tmp, f"huge.{name}")
            make(path, size)
            best, median = scan(path, args.runs)
            print(f"(a) {os.path.getsize(path) / 1e9:.1f} GB sparse {name}: modelscan -p {best:.3f} s min, "
                  f"{median:.3f} s median (target <= 0.1 s)")
            os.unlink(path)
        per_file = {}
        distinct = lambda path, i: small_gguf(path, i, distinct=True)  # noqa: E731
        for name, make in (("pickle", small_pickle), ("onnx", small_onnx), ("gguf", small_gguf), ("gguf-distinct", distinct)):
            folder = os.path.join(tmp, name)
            os.mkdir(folder)
            ext = {"pickle": "pkl", "gguf-distinct": "gguf"}.get(name, name)
            for i in range(args.files):
                make(os.path.join(folder, f"m{i}.{ext}"), i)
            best, median = scan(folder, max(3, args.runs // 3))
            one = os.path.join(tmp, f"one-{name}")
            os.mkdir(one)
            shutil.copy(os.path.join(folder, f"m0.{ext}"), one)
            single, _ = scan(one, max(3, args.runs // 3))
            per_file[name] = (best - single) / (args.files - 1)
            print(f"(b) {args.files} small {name} files: {best:.2f} s min, {median:.2f} s median; one file {single:.3f} s; "
                  f"{best / args.files * 1000:.2f} ms per file overall, {per_file[name] * 1000:.2f} ms per extra file")
            shutil.rmtree(folder)
            shutil.rmtree(one)
        for name in ("onnx", "gguf", "gguf-distinct"):
            print(f"    {name} / pickle, per extra file: {per_file[name] / per_file['pickle']:.2f}")
        path = os.path.join(tmp, "frozen_graph.pb")
        big_graphdef(path, args.nodes)
        print(f"(c) GraphDef of {args.nodes} nodes, {os.path.getsize(path) / 1e6:.0f} MB:")
        for name, code in _READERS.items():
            elapsed, rss = min(reader(code, path) for _ in range(3))
            print(f"    {name:32s} {elapsed:6.2f} s, peak RSS {rss} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
