"""OpenAI request and response models (pydantic v2), one import for the routes and the tests.

Parts (each module one noun):
- `api/openai_requests.py`: the requests (`CompletionRequest`, `ChatCompletionRequest`, their parts,
  vLLM's tokenize / detokenize requests) and how unsupported options are refused.
- `api/openai_responses.py`: the responses and stream chunks, `Usage`, `ModelCard` / `ModelList`,
  `ErrorResponse`, vLLM's tokenize / detokenize responses.
"""

from __future__ import annotations

from api.openai_requests import (MAX_CHOICES, MAX_STOP_STRINGS, ChatCompletionRequest, ChatMessage,
                                 CompletionRequest, DetokenizeRequest, FunctionCallIn, FunctionDef, Prompt,
                                 StreamOptions, StructuredOutputs, TextPart, TokenizeChatRequest,
                                 TokenizeCompletionRequest, TokenizeRequest, ToolCallIn, ToolDef, _Request)
from api.openai_responses import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                  ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessageOut, ChatTokenLogprob,
                                  ChatTopLogprob, CompletionChoice, CompletionChunk, CompletionChunkChoice,
                                  CompletionLogprobs, CompletionOutChoice, CompletionResponse, DetokenizeResponse,
                                  ErrorBody, ErrorResponse, FunctionCallDelta, FunctionCallOut, ModelCard, ModelList,
                                  PromptLogprobEntry, PromptTokensDetails, TokenizeResponse, ToolCallDelta,
                                  ToolCallOut, Usage)

__all__ = ["ChatChoice", "ChatChunkChoice", "ChatCompletionChunk", "ChatCompletionRequest", "ChatCompletionResponse",
           "ChatDelta", "ChatLogprobs", "ChatMessage", "ChatMessageOut", "ChatTokenLogprob", "ChatTopLogprob",
           "CompletionChoice", "CompletionChunk", "CompletionChunkChoice", "CompletionLogprobs",
           "CompletionOutChoice", "CompletionRequest", "CompletionResponse", "DetokenizeRequest",
           "DetokenizeResponse", "ErrorBody", "ErrorResponse", "FunctionCallDelta", "FunctionCallIn",
           "FunctionCallOut", "FunctionDef", "MAX_CHOICES", "MAX_STOP_STRINGS", "ModelCard", "ModelList", "Prompt",
           "PromptLogprobEntry", "PromptTokensDetails", "StreamOptions", "StructuredOutputs", "TextPart",
           "TokenizeChatRequest", "TokenizeCompletionRequest", "TokenizeRequest", "TokenizeResponse",
           "ToolCallDelta", "ToolCallIn", "ToolCallOut", "ToolDef", "Usage", "_Request"]
