"""preprocessing: text -> token ids (the model's HF tokenizer; BOS added exactly once), and the word
lists, the bad words with the engine's padding ids (common.padding_ids)."""

import numpy as np
import triton_python_backend_utils as pb_utils
from build_engine.tokenization import load_tokenizer

from common.limits import check_sampling
from model_repo.triton_models.common import (BadRequest, PromptEncoder, check_no_parameters, padding_ids, params,
                                             refusal, scalar, strings, to_words_list)


class TritonPythonModel:
    def initialize(self, args):
        p = params(args)
        self.tok = load_tokenizer(p["tokenizer_dir"])
        self.end_id, self.pad_id = int(p["end_id"]), int(p["pad_id"])
        self.prompts = PromptEncoder(self.tok, int(p["max_input_len"]))
        self.max_output_len, self.max_seq_len = int(p["max_output_len"]), int(p["max_seq_len"])
        self.padding = padding_ids(self.tok, p)

    def _one(self, request):
        check_no_parameters(request)  # the ensemble passes its request's parameters to each step
        ids = self.prompts.encode(scalar(pb_utils, request, "QUERY"))
        out_len = scalar(pb_utils, request, "REQUEST_OUTPUT_LEN")
        if out_len is None:
            raise BadRequest("max_tokens is required")
        check_sampling(max_tokens=out_len, max_output_len=self.max_output_len,  # the backend would take any
                       prompt_tokens=len(ids), max_seq_len=self.max_seq_len)
        end_id = scalar(pb_utils, request, "END_ID", self.end_id)
        pad_id = scalar(pb_utils, request, "PAD_ID", self.pad_id)
        tensors = [
            pb_utils.Tensor("INPUT_ID", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("REQUEST_INPUT_LEN", np.array([[len(ids)]], dtype=np.int32)),
            pb_utils.Tensor("OUT_REQUEST_OUTPUT_LEN", np.array([[out_len]], dtype=np.int32)),
            pb_utils.Tensor("OUT_END_ID", np.array([[end_id]], dtype=np.int32)),
            pb_utils.Tensor("OUT_PAD_ID", np.array([[pad_id]], dtype=np.int32)),
            pb_utils.Tensor("STOP_WORDS_IDS", to_words_list(self.tok, strings(pb_utils, request, "STOP_WORDS"))[None]),
            pb_utils.Tensor("BAD_WORDS_IDS", to_words_list(self.tok, strings(pb_utils, request, "BAD_WORDS"),
                                                           self.padding)[None]),
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                responses.append(self._one(r))
            except (BadRequest, ValueError) as e:
                responses.append(pb_utils.InferenceResponse(error=refusal(pb_utils, str(e))))
        return responses
