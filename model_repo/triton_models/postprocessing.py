"""postprocessing: token ids -> text, statelessly. Leading SentencePiece spaces are kept by decoding
behind a fixed prefix token; the CPU tensorrt_llm model only emits UTF-8-complete chunks, so
streamed chunks never split a character (on the GPU backend use the BLS model for exact deltas)."""

import numpy as np
import triton_python_backend_utils as pb_utils
from build_engine.tokenization import load_tokenizer

from model_repo.triton_models.common import BadRequest, params, refusal


class TritonPythonModel:
    def initialize(self, args):
        p = params(args)
        self.tok = load_tokenizer(p["tokenizer_dir"])
        self.skip = {int(p["end_id"]), int(p["pad_id"])}
        self.prefix = self.tok("a", add_special_tokens=False)["input_ids"][-1:]
        self.prefix_text = self.tok.decode(self.prefix)
        self.vocab_size = len(self.tok)

    def _decode(self, ids):
        ids = [int(i) for i in ids if int(i) not in self.skip]
        if not ids:
            return ""
        return self.tok.decode(self.prefix + ids)[len(self.prefix_text):]

    def _texts(self, r) -> np.ndarray:
        tokens = pb_utils.get_input_tensor_by_name(r, "TOKENS_BATCH").as_numpy()  # [B, beams, T]
        lengths = pb_utils.get_input_tensor_by_name(r, "SEQUENCE_LENGTH").as_numpy()  # [B, beams]
        if lengths.shape != tokens.shape[:2]:
            raise BadRequest(f"SEQUENCE_LENGTH has shape {list(lengths.shape)}; TOKENS_BATCH {list(tokens.shape)} "
                             f"needs {list(tokens.shape[:2])}")
        if lengths.size and not (0 <= lengths.min() and lengths.max() <= tokens.shape[2]):
            raise BadRequest(f"SEQUENCE_LENGTH must be within [0, {tokens.shape[2]}]")
        used = [tokens[b, k, : lengths[b, k]] for b in range(tokens.shape[0]) for k in range(tokens.shape[1])]
        bad = [int(i) for row in used for i in row if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        texts = [[self._decode(tokens[b, k, : lengths[b, k]]).encode("utf-8") for k in range(tokens.shape[1])]
                 for b in range(tokens.shape[0])]
        return np.array(texts, dtype=object)

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                out = self._texts(r)
            except BadRequest as e:
                responses.append(pb_utils.InferenceResponse(error=refusal(pb_utils, str(e))))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)]))
        return responses
