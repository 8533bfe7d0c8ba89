"""postprocessing: token ids -> text, statelessly. Leading SentencePiece spaces are kept by decoding
behind a fixed prefix token; the CPU tensorrt_llm model only emits UTF-8-complete chunks, so
streamed chunks never split a character (on the GPU backend use the BLS model for exact deltas)."""

import numpy as np
import triton_python_backend_utils as pb_utils
from build_engine.tokenization import load_tokenizer

from model_repo.triton_models.common import params


class TritonPythonModel:
    def initialize(self, args):
        p = params(args)
        self.tok = load_tokenizer(p["tokenizer_dir"])
        self.skip = {int(p["end_id"]), int(p["pad_id"])}
        self.prefix = self.tok("a", add_special_tokens=False)["input_ids"][-1:]
        self.prefix_text = self.tok.decode(self.prefix)

    def _decode(self, ids):
        ids = [int(i) for i in ids if int(i) not in self.skip]
        if not ids:
            return ""
        return self.tok.decode(self.prefix + ids)[len(self.prefix_text):]

    def execute(self, requests):
        responses = []
        for r in requests:
            tokens = pb_utils.get_input_tensor_by_name(r, "TOKENS_BATCH").as_numpy()  # [B, beams, T]
            lengths = pb_utils.get_input_tensor_by_name(r, "SEQUENCE_LENGTH").as_numpy()  # [B, beams]
            texts = [[self._decode(tokens[b, k, : lengths[b, k]]).encode("utf-8") for k in range(tokens.shape[1])]
                     for b in range(tokens.shape[0])]
            out = np.array(texts, dtype=object)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)]))
        return responses
