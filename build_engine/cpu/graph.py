"""The CPU engine's graph writer: an ONNX INT4 decoder written from the TensorRT-LLM W4A16_AWQ
checkpoint, run by build_engine.cpu.scheduler (its genai_config.json keeps it loadable by
onnxruntime-genai too). It executes the same codes, scales and pre-quant factors that trtllm-build
consumes, so CPU tests check the GPU artifact.

Per layer (x: [B, S, H]; p_* the AWQ pre-quant factors, folded where the algebra allows):
  h  = SimplifiedLayerNorm(x) | SkipSimplifiedLayerNorm(x, residual)   # weight * p_qkv
  qkv = MatMulNBits(h)                            # int4 codes repacked along K, block = group
  a  = GroupQueryAttention(qkv, past, rotary cos/sin, local_window_size = sliding window)
  x' = x + MatMulNBits(a * p_dense)
  h' = SkipSimplifiedLayerNorm(x', x)             # weight * p_fc
  m  = silu(MatMulNBits(h')) * MatMulNBits'(h' * p_gate / p_fc)   # ' : scales rows * p_proj
  x'' = x' + MatMulNBits(m)
logits = ln_f(x)[:, -1] @ lm_head^T  # last position only; (lm_head fp32 = exact, or int8/int4 MatMulNBits = fast)
The logits span the checkpoint's padded vocabulary, as the TensorRT-LLM engine's do: ModelOpt pads the
table to a multiple of 64 with zero rows, whose logits are 0, so either engine can sample an id the
tokenizer does not have unless the request bans them (the Triton models do: common.padding_ids).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from build_engine import UserError, checkpoint, manifest
from build_engine.cli import quiet_progress

ENGINE_KIND = "cpu-engine"
MODEL_FILE = "model.onnx"
TRT_TO_HF_TYPE = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama"}


def repack_for_matmulnbits(codes: np.ndarray, group: int) -> np.ndarray:
    """int8 codes [N, K] in [-8, 7] -> uint8 [N, K/group, group/2]: unsigned (code + 8), two
    consecutive K elements per byte, even k in the low nibble (MatMulNBits' layout, zero point 8)."""
    n, k = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed.reshape(n, k // group, group // 2)


def rotary_cache(max_len: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_len, head_dim/2] for GPT-NeoX (half-split) rotary embeddings."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Graph:
    """A small builder over onnx.helper: nodes, initializers, unique names."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        outs = [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs


LM_HEADS = ("fp32", "int8", "int4")
LM_HEAD_BLOCK = 32


def quantize_lm_head(w: np.ndarray, bits: int, block: int = LM_HEAD_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """fp32 [N, K] -> (codes, scales fp32 [N * K/block]): symmetric round-to-nearest per row and block of
    K, in MatMulNBits' layout for `bits` with its default zero point: 8 bits, uint8 [N, K/block, block] =
    code + 128; 4 bits, two codes + 8 a byte (repack_for_matmulnbits)."""
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(n, k // block, block)
    scale = np.abs(blocks).max(-1, keepdims=True) / qmax
    scale[scale == 0] = 1
    codes = np.clip(np.rint(blocks / scale), -qmax, qmax).astype(np.int16)
    packed = ((codes + 128).astype(np.uint8) if bits == 8
              else repack_for_matmulnbits(codes.reshape(n, k).astype(np.int8), block))
    return packed, scale.reshape(-1).astype(np.float32)


def _linear(g: _Graph, ck: checkpoint.Checkpoint, layer: int, name: str, x: str, accuracy_level: int,
            input_factor: np.ndarray | None, output_factor: np.ndarray | None = None) -> str:
    """MatMulNBits over the checkpoint's codes and scales. `input_factor`: what x is multiplied by
    first (the AWQ pre-quant factor, or what is left of it after folding; None: nothing).
    `output_factor`: per output row, folded into the scales (the next layer's pre-quant factor)."""
    ql = ck.linear(layer, name)
    n, k = ql.codes.shape
    grp = ql.group_size
    p = f"layers.{layer}.{name}"
    if input_factor is not None:
        x = g.node("Mul", [x, g.init(f"{p}.prequant", input_factor)], f"{p}/prequant")[0]
    scales = ql.scale if output_factor is None else ql.scale * output_factor[:, None]
    return g.node(
        "MatMulNBits",
        [x, g.init(f"{p}.qweight", repack_for_matmulnbits(ql.codes, grp)), g.init(f"{p}.scales", scales)],
        f"{p}/matmul", domain="com.microsoft", K=k, N=n, bits=4, block_size=grp, accuracy_level=accuracy_level,
    )[0]


def _mask_inputs(g: _Graph) -> tuple[str, str]:
    """GroupQueryAttention wants seqlens_k = (tokens so far) - 1 and the total length, both int32,
    derived once from attention_mask for every layer."""
    from onnx import TensorProto

    one = g.init("const.one", np.array([1], dtype=np.int64))
    total = g.node("ReduceSum", ["attention_mask", one], "mask/sum", keepdims=0)[0]
    seqlens_k = g.node("Cast", [g.node("Sub", [total, one], "mask/sub")[0]], "mask/seqlens_k", to=TensorProto.INT32)[0]
    shape = g.node("Shape", ["attention_mask"], "mask/shape")[0]
    total_len = g.node("Cast", [g.node("Gather", [shape, g.init("const.idx1", np.array(1, dtype=np.int64))],
                                       "mask/total", axis=0)[0]], "mask/total_len", to=TensorProto.INT32)[0]
    return seqlens_k, total_len


def _attention(g: _Graph, ck: checkpoint.Checkpoint, i: int, h: str, pre: dict, rope: tuple[str, str],
               mask: tuple[str, str], window: int, accuracy_level: int) -> tuple[str, list, list]:
    """Fused qkv -> GroupQueryAttention (rotary inside, past/present KV as graph inputs/outputs) ->
    dense. Returns the attention output and the layer's KV value infos (inputs, outputs)."""
    from onnx import TensorProto, helper

    s = ck.shapes
    B, T, P = "batch_size", "total_sequence_length", "past_sequence_length"
    qkv = _linear(g, ck, i, "attention.qkv", h, accuracy_level, None)  # its pre-quant factor is in the norm
    kv_in = [helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                           [B, s.kv_heads, P, s.head_dim]) for kind in ("key", "value")]
    kv_out = [helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                            [B, s.kv_heads, T, s.head_dim]) for kind in ("key", "value")]
    attn, present_k, present_v = g.node(
        "GroupQueryAttention",
        [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", *mask, *rope],
        f"layers.{i}/attention", n_out=3, domain="com.microsoft",
        num_heads=s.heads, kv_num_heads=s.kv_heads, scale=float(s.head_dim) ** -0.5,
        local_window_size=window, do_rotary=1, rotary_interleaved=0)
    g.nodes.append(helper.make_node("Identity", [present_k], [f"present.{i}.key"], name=f"layers.{i}/pk"))
    g.nodes.append(helper.make_node("Identity", [present_v], [f"present.{i}.value"], name=f"layers.{i}/pv"))
    out = _linear(g, ck, i, "attention.dense", attn, accuracy_level, pre["attention.dense"])
    return out, kv_in, kv_out


def _mlp(g: _Graph, ck: checkpoint.Checkpoint, i: int, h: str, pre: dict, fold_fc: bool, accuracy_level: int) -> str:
    """SwiGLU: proj(silu(fc(h)) * gate(h)), with proj's pre-quant factor folded into gate's rows and,
    when `fold_fc`, fc's into the norm before (gate keeps the ratio)."""
    fc = _linear(g, ck, i, "mlp.fc", h, accuracy_level, None if fold_fc else pre["mlp.fc"])  # HF gate_proj
    up = _linear(g, ck, i, "mlp.gate", h, accuracy_level, pre["mlp.gate"] / pre["mlp.fc"] if fold_fc
                 else pre["mlp.gate"], output_factor=pre["mlp.proj"])  # HF up_proj
    act = g.node("Mul", [fc, g.node("Sigmoid", [fc], f"layers.{i}/sigmoid")[0]], f"layers.{i}/silu")[0]
    return _linear(g, ck, i, "mlp.proj", g.node("Mul", [act, up], f"layers.{i}/gated")[0], accuracy_level, None)


def _lm_head(g: _Graph, ck: checkpoint.Checkpoint, last: str, lm_head: str, accuracy_level: int):
    from onnx import helper

    head = ck.tensor("lm_head.weight")  # [V padded, H], as trtllm-build takes it
    if lm_head == "fp32":  # exact: dense as in the checkpoint (excluded from AWQ); fp16 -> fp32 is exact
        g.nodes.append(helper.make_node("MatMul", [last, g.init("lm_head", head.T.copy())], ["logits"], name="lm_head"))
    else:  # the fast options, per row and block of 32: int8 reads a quarter of the bytes per token, int4 an eighth
        bits = int(lm_head[3:])
        codes, scales = quantize_lm_head(head, bits)
        g.nodes.append(helper.make_node(
            "MatMulNBits", [last, g.init("lm_head.qweight", codes), g.init("lm_head.scales", scales)], ["logits"],
            name="lm_head", domain="com.microsoft", K=head.shape[1], N=head.shape[0], bits=bits,
            block_size=LM_HEAD_BLOCK, accuracy_level=accuracy_level))


def build_graph(ck: checkpoint.Checkpoint, sliding_window: int | None, context_length: int,
                accuracy_level: int, lm_head: str = "fp32"):
    """The decoder as an onnx.ModelProto (weights inline; saved with external data): embedding, the
    decoder layers (norm, attention, norm, MLP, residuals fused into the norms), the final norm and
    the lm_head on the last position only (the next token is all the runtime samples)."""
    from onnx import TensorProto, helper
    from tqdm.auto import tqdm

    s, cfg = ck.shapes, ck.config
    eps = float(cfg["norm_epsilon"])
    g = _Graph()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, ck.shapes.vocab_padded])]
    mask = _mask_inputs(g)
    cos, sin = rotary_cache(context_length, s.head_dim, float(cfg["rotary_base"]))
    rope = (g.init("cos_cache", cos), g.init("sin_cache", sin))
    window = int(sliding_window) if sliding_window else -1

    x = g.node("Gather", [g.init("vocab_embedding", ck.tensor("transformer.vocab_embedding.weight")), "input_ids"],
               "embed")[0]
    residual = None
    for i in tqdm(range(s.layers), desc="writing CPU engine layers", unit="layer", disable=quiet_progress()):
        # AWQ pre-quant factors are folded where the algebra allows (x * p enters a linear map):
        # qkv's into the first norm's weight, fc's into the second norm's (gate keeps the ratio),
        # proj's into the rows of gate (up_proj), whose output it multiplies. dense's stays a Mul.
        pre = {n: ck.linear(i, n).prequant for n in checkpoint.LINEARS}
        fold_fc = bool(np.all(pre["mlp.fc"] != 0))
        ln1 = g.init(f"layers.{i}.input_layernorm", ck.norm(i, "input_layernorm") * pre["attention.qkv"])
        if residual is None:
            h = g.node("SimplifiedLayerNormalization", [x, ln1], f"layers.{i}/ln1", epsilon=eps, axis=-1,
                       stash_type=1)[0]
            residual = x
        else:
            outs = g.node("SkipSimplifiedLayerNormalization", [residual, x, ln1], f"layers.{i}/ln1", n_out=4,
                          domain="com.microsoft", epsilon=eps)
            h, residual = outs[0], outs[3]
        x, kv_in, kv_out = _attention(g, ck, i, h, pre, rope, mask, window, accuracy_level)
        inputs += kv_in
        outputs += kv_out
        ln2 = g.init(f"layers.{i}.post_layernorm",
                     ck.norm(i, "post_layernorm") * (pre["mlp.fc"] if fold_fc else 1))
        outs = g.node("SkipSimplifiedLayerNormalization", [residual, x, ln2], f"layers.{i}/ln2", n_out=4,
                      domain="com.microsoft", epsilon=eps)
        h, residual = outs[0], outs[3]
        x = _mlp(g, ck, i, h, pre, fold_fc, accuracy_level)
    final = g.node("SkipSimplifiedLayerNormalization", [residual, x, g.init("ln_f", ck.tensor("transformer.ln_f.weight"))],
                   "ln_f", n_out=4, domain="com.microsoft", epsilon=eps)[0]
    last = g.node("Gather", [final, g.init("const.last", np.array([-1], dtype=np.int64))], "last_token", axis=1)[0]
    _lm_head(g, ck, last, lm_head, accuracy_level)

    graph = helper.make_graph(g.nodes, "hermes_trtllm_cpu_decoder", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             producer_name="hermes-trtllm")


def genai_config(ck: checkpoint.Checkpoint, facts: dict, context_length: int, max_batch_size: int) -> dict:
    s = ck.shapes
    window = facts.get("sliding_window")
    decoder = {
        "session_options": {"log_id": "hermes-cpu-engine", "provider_options": [], "intra_op_num_threads": 0},
        "filename": MODEL_FILE,
        "head_size": s.head_dim, "hidden_size": s.hidden,
        "num_attention_heads": s.heads, "num_hidden_layers": s.layers, "num_key_value_heads": s.kv_heads,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
    }
    if window:
        decoder["sliding_window"] = {"window_size": int(window), "slide_key_value_cache": False,
                                     "slide_inputs": False, "layers": [], "cache_slack": 0}
    return {
        "model": {
            "type": TRT_TO_HF_TYPE.get(ck.config["architecture"], "llama"),
            "bos_token_id": facts["bos_id"], "eos_token_id": facts["end_id"], "pad_token_id": facts["pad_id"],
            "vocab_size": s.vocab_padded, "context_length": context_length, "decoder": decoder,
        },
        "engine": {"static_batching": {"max_batch_size": max_batch_size}},
        "search": {"do_sample": False, "max_length": context_length, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


def build(ckpt: Path, output: Path, accuracy_level: int = 4, lm_head: str = "fp32") -> Path:
    import onnx

    from build_engine import presets

    if accuracy_level not in (1, 2, 3, 4):
        raise UserError(f"accuracy level {accuracy_level} is not one of 1 (fp32), 2, 3, 4 (int8 activations)")
    if lm_head not in LM_HEADS:
        raise UserError(f"lm_head {lm_head!r} is not one of {', '.join(LM_HEADS)}")
    ckpt, output = Path(ckpt), Path(output)
    ck_manifest = manifest.read(ckpt, "trtllm-checkpoint")
    facts = ck_manifest["model"]
    checkpoint.validate(ckpt, real_vocab=facts["vocab_size"])
    limits = presets.limits_for(ck_manifest)
    context_length = min(limits.max_seq_len, facts["max_position_embeddings"])
    ck = checkpoint.Checkpoint(ckpt)

    with manifest.staging(output) as tmp:
        model = build_graph(ck, facts.get("sliding_window"), context_length, accuracy_level,
                            lm_head)
        onnx.save_model(model, tmp / MODEL_FILE, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data", size_threshold=1024)
        (tmp / "genai_config.json").write_text(json.dumps(
            genai_config(ck, facts, context_length, limits.max_batch_size), indent=2))
        shutil.copytree(ckpt / "tokenizer", tmp / "tokenizer")
        manifest.write(
            tmp, ENGINE_KIND,
            checkpoint={"path": str(ckpt.resolve()), "files": ck_manifest["files"]},
            preset=ck_manifest.get("preset"),
            settings={"accuracy_level": accuracy_level, "context_length": context_length,
                      "sliding_window": facts.get("sliding_window"), "kv_cache_dtype": "float32",
                      "group_size": ck.shapes.group_size, "lm_head": lm_head, "lm_head_detail": {
                          "fp32": "dense fp32 (exact)",
                          "int8": f"int8 symmetric per row and block of {LM_HEAD_BLOCK}, MatMulNBits",
                          "int4": f"int4 symmetric per row and block of {LM_HEAD_BLOCK}, MatMulNBits"}[lm_head],
                      "logits": "last position",
                      "prequant": "qkv's folded into input_layernorm, fc's into post_layernorm (gate keeps "
                                  "gate/fc), proj's into gate's scales; dense's a Mul"},
            limits=vars(limits), model=facts,
            # The width it samples over: the checkpoint's padded vocabulary (rows past the tokenizer's are zero).
            engine_vocab_size=ck.shapes.vocab_padded,
        )
    return output
