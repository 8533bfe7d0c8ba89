"""The CPU engine's graph in an onnxruntime session, over one KV cache shared by all slots.

The cache is one buffer per layer and kind, [rows, kv_heads, capacity, head_dim], and every call
binds it as both `past_key_values.*` and `present.*` (GroupQueryAttention's shared-buffer mode:
it writes the new positions in place and reads each row's own length from the attention mask).
A call covers a contiguous range of rows, so the scheduler keeps live requests in rows 0..n-1.

The buffer is anonymous memory, committed only where it is written; `release(row)` gives a
finished row's pages back to the system, so resident KV memory follows the tokens in flight.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE


class Decoder:
    def __init__(self, engine_dir: Path, rows: int, capacity: int, threads: int = 0):
        import onnxruntime as ort

        cfg = json.loads((Path(engine_dir) / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"]
        self.rows, self.capacity = rows, capacity
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # onnxruntime's pool threads spin inside a run (fast hand-offs between ops) but not after it: between
        # steps the two cores belong to sampling, the readers of the streams and, when served, the stubs.
        # One `make bench` run each way: engine alone +17 % output tok/s at concurrency 8, served +8 %.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(Path(engine_dir) / cfg["filename"]), opts,
                                            providers=["CPUExecutionProvider"])
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab = int(logits.shape[-1])
        self.row_bytes = self.kv_heads * capacity * self.head_dim * 4
        self.tensor_bytes = rows * self.row_bytes
        # Private anonymous memory: MADV_DONTNEED frees its pages (a shared mapping would keep them).
        self._mem = mmap.mmap(-1, 2 * self.layers * self.tensor_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        flat = np.frombuffer(self._mem, dtype=np.float32)
        per = self.tensor_bytes // 4
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        self.kv = [flat[i * per:(i + 1) * per].reshape(shape) for i in range(2 * self.layers)]
        self.names = [(f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}",
                       f"present.{i // 2}.{'key' if i % 2 == 0 else 'value'}") for i in range(2 * self.layers)]
        self._bindings: dict[tuple[int, int], tuple[object, np.ndarray]] = {}

    def _binding(self, start: int, n: int):
        key = (start, n)
        if key not in self._bindings:
            b = self.session.io_binding()
            shape = [n, self.kv_heads, self.capacity, self.head_dim]
            for arr, (past, present) in zip(self.kv, self.names):
                ptr = arr.ctypes.data + start * self.row_bytes
                b.bind_input(past, "cpu", 0, np.float32, shape, ptr)
                b.bind_output(present, "cpu", 0, np.float32, shape, ptr)
            out = np.empty((n, 1, self.vocab), dtype=np.float32)
            b.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self._bindings[key] = (b, out)
        return self._bindings[key]

    def forward(self, start: int, ids: np.ndarray, totals: list[int]) -> np.ndarray:
        """Run rows start..start+n-1: `ids` [n, S] are the new tokens of each row, `totals[i]` the
        row's length after them (its first totals[i] - S positions are already in the cache).
        Returns the last position's logits [n, V], valid until the next call for the same rows."""
        n = ids.shape[0]
        b, out = self._binding(start, n)
        totals_arr = np.asarray(totals, dtype=np.int64)
        mask = (np.arange(int(totals_arr.max()), dtype=np.int64)[None, :] < totals_arr[:, None]).astype(np.int64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)  # both arrays stay referenced until the run ends
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(b)
        return out[:, 0, :]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a row's first `length` positions to another row (the scheduler compacts live rows)."""
        for arr in self.kv:
            arr[dst, :, :length] = arr[src, :, :length]

    def release(self, row: int) -> None:
        """Return a row's pages to the system (they read as zeros afterwards)."""
        for i in range(2 * self.layers):
            start = i * self.tensor_bytes + row * self.row_bytes
            lo = -(-start // PAGE) * PAGE
            hi = (start + self.row_bytes) // PAGE * PAGE
            if hi > lo:
                self._mem.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
