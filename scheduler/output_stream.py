"""What the client sees of a request: one `GenerationOutput` per accepted token.

Parts:
- `OutputStream`: holds the request's incremental detokenizer; `step(taken, output)` turns an
  accepted token into the streamed step (new text, logprobs when asked for, finish reason: a stop
  string ends the request with "stop", the last stage's eos or length with its own reason, and
  the held-back text is flushed at the end).
"""

from __future__ import annotations

from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.request import GenerationOutput, GenerationRequest, TokenLogprob
from scheduler.request_state import TokenTaken
from scheduler.tokenizer import Tokenizer
from workers.protocol import TokenOutput


class OutputStream:
    def __init__(self, tokenizer: Tokenizer, request: GenerationRequest) -> None:
        self.request = request
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, request.stop,
                                                  request.skip_special_tokens)
        self.num_cached_tokens = 0  # prompt tokens the prefix cache held (known from the first token)

    def step(self, taken: TokenTaken, output: TokenOutput) -> GenerationOutput:
        if taken.index == 0:
            self.num_cached_tokens = min(output.num_cached_tokens, len(self.request.prompt_token_ids))
        text_step = self.detokenizer.add(taken.token_id)
        finish_reason = "stop" if text_step.stopped else output.finish_reason
        text = text_step.text
        if not text_step.stopped and finish_reason is not None:
            text += self.detokenizer.flush()
        logprobs = ()
        if self.request.sampling.num_top_logprobs is not None and output.logprob is not None:
            logprobs = (TokenLogprob(taken.token_id, output.logprob, tuple(output.top_logprobs)),)
        return GenerationOutput(
            request_id=self.request.request_id,
            text=text,
            token_ids=(taken.token_id,),
            logprobs=logprobs,
            finish_reason=finish_reason,
            num_prompt_tokens=len(self.request.prompt_token_ids),
            num_generated_tokens=taken.index + 1,
            prompt_logprobs=output.prompt_logprobs,
            num_cached_tokens=self.num_cached_tokens,
        )
