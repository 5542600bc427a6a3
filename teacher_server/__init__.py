"""The teacher logit server: a FastAPI service returning a frozen teacher's next-token logprobs."""
