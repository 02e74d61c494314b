"""Glue between requests and output-length predictors (shared by every size-aware policy)."""

from __future__ import annotations

from chameleon.sched.predictors import OutputLengthPredictor, PredictionInput
from chameleon.sched.request import Request


def prediction_input(request: Request) -> PredictionInput:
    # The oracle's truth: a request that ignores EOS runs exactly max_tokens (how simulated and
    # benchmark workloads encode their known output lengths).
    truth = request.sampling.max_tokens if request.sampling.ignore_eos else None
    return PredictionInput(
        request_id=request.request_id,
        adapter=request.adapter,
        prompt_len=len(request.prompt_token_ids),
        true_output_len=truth,
        max_tokens=request.sampling.max_tokens,
    )


def predict(predictor: OutputLengthPredictor, request: Request) -> int:
    """The predicted output length; the policy keeps it in its own entry for the request."""
    return predictor.predict(prediction_input(request))


def observe(predictor: OutputLengthPredictor, request: Request) -> None:
    predictor.observe(prediction_input(request), len(request.output_token_ids))
