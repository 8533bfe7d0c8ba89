"""An independent PyTorch reference for the checkpoint: dequantizes every linear to fp32 and runs a
plain Llama/Mistral forward (no KV cache, explicit causal + sliding-window mask). It shares nothing
with the CPU engine but the checkpoint reader, so agreement checks the engine's graph and kernels."""

from __future__ import annotations

import numpy as np
import torch

from build_engine import checkpoint


class Reference:
    def __init__(self, ckpt_path, real_vocab: int, sliding_window: int | None):
        ck = checkpoint.Checkpoint(ckpt_path)
        self.s, self.eps = ck.shapes, float(ck.config["norm_epsilon"])
        self.base = float(ck.config["rotary_base"])
        self.window = sliding_window
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        self.embed = t(ck.tensor("transformer.vocab_embedding.weight"))
        self.ln_f = t(ck.tensor("transformer.ln_f.weight"))
        self.lm_head = t(ck.tensor("lm_head.weight")[:real_vocab])
        self.layers = [
            {**{n: t(ck.linear(i, n).effective_weight()) for n in checkpoint.LINEARS},
             **{n: t(ck.norm(i, n)) for n in checkpoint.NORMS}}
            for i in range(self.s.layers)
        ]

    def _rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def _rope(self, x, pos):  # x: [heads, S, D], GPT-NeoX half split
        d = x.shape[-1]
        inv = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = (pos[:, None].double() * inv[None, :])
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        """fp32 logits [S, real_vocab] for one sequence."""
        s = self.s
        n = len(ids)
        pos = torch.arange(n)
        mask = pos[None, :] <= pos[:, None]  # key j visible to query i
        if self.window:
            mask &= pos[None, :] > pos[:, None] - self.window
        x = self.embed[torch.tensor(ids)]
        q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for L in self.layers:
            h = self._rms(x, L["input_layernorm"])
            qkv = h @ L["attention.qkv"].T
            q = qkv[:, :q_dim].view(n, s.heads, s.head_dim).transpose(0, 1)
            k = qkv[:, q_dim : q_dim + kv_dim].view(n, s.kv_heads, s.head_dim).transpose(0, 1)
            v = qkv[:, q_dim + kv_dim :].view(n, s.kv_heads, s.head_dim).transpose(0, 1)
            q, k = self._rope(q, pos), self._rope(k, pos)
            rep = s.heads // s.kv_heads
            k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            att = (q @ k.transpose(1, 2)) / s.head_dim ** 0.5
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            a = (att @ v).transpose(0, 1).reshape(n, q_dim)
            x = x + a @ L["attention.dense"].T
            h = self._rms(x, L["post_layernorm"])
            fc, up = h @ L["mlp.fc"].T, h @ L["mlp.gate"].T
            x = x + (torch.nn.functional.silu(fc) * up) @ L["mlp.proj"].T
        return (self._rms(x, self.ln_f) @ self.lm_head.T).numpy()

    def greedy(self, ids: list[int], max_new: int, end_id: int | None) -> list[int]:
        out = []
        for _ in range(max_new):
            nxt = int(self.logits(ids + out)[-1].argmax())
            out.append(nxt)
            if nxt == end_id:
                break
        return out
