"""client: what services import to talk to the deployed model (ChatML prompts, gRPC streaming).

Light on purpose: tritonclient and numpy only; tokenization is the server's job.

    from client import Client, Message
    with Client("127.0.0.1:8001") as c:
        for chunk in c.stream([Message("user", "What is the capital of France?")], max_tokens=64):
            print(chunk.text, end="")
"""

from client.chatml import format_chatml
from client.client import AsyncClient, Client, Conversation
from client.errors import (BadRequestError, CancelledError, ClientError, DeadlineExceededError, OverloadedError,
                           ServerError, UnavailableError, error_from_grpc)
from client.types import Chunk, Completion, Message, SamplingParams

__all__ = ["AsyncClient", "BadRequestError", "CancelledError", "Chunk", "Client", "ClientError", "Completion",
           "Conversation", "DeadlineExceededError", "Message", "OverloadedError", "SamplingParams", "ServerError",
           "UnavailableError", "error_from_grpc", "format_chatml"]
